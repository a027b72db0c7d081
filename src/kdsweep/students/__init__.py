"""Students: planning a stage's students (`plan`), training them one by one or stacked under
vmap (`train`, `stack`), reusing rows whose content key is unchanged (`reuse`), running stacks
here or on Dask (`executor`), and a whole stage (`stage`); each student is one
`kdsweep.runs.RunRecord`."""
