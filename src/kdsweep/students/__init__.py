"""Students: planning a stage's students (`plan`), training them one by one or stacked under
vmap (`train`, `stack`), each described by one `kdsweep.runs.RunRecord`."""
