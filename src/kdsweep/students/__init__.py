"""Students: what a stage reads (`inputs`), planning its students (`plan`), training them one by
one or stacked under vmap (`fit`, `stack`), describing each as one `kdsweep.runs.RunRecord`
(`records`), reusing rows whose content key is unchanged (`reuse`), running stacks here or on
Dask (`executor`), and a whole stage (`stage`)."""
