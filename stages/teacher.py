"""DVC stage `teacher`: train the teacher on the full training split (kdsweep.pipeline.train_teacher).

Also runs under `torchrun --nproc-per-node N stages/teacher.py` (DistributedDataParallel).
"""

from kdsweep import pipeline
from kdsweep.config import load_params
from kdsweep.distributed import process_group
from kdsweep.errors import explained_errors

if __name__ == "__main__":
    with explained_errors(), process_group() as (rank, world):
        pipeline.train_teacher(load_params(), rank, world)
