"""Datasets: the splits (`splits`), one loader per source (`sources`, `images`, `text`, named in
`kdsweep.registry.DATASETS`) and the prepared, nested α-subsets the pipeline trains on
(`prepared`)."""
