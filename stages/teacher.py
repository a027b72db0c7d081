"""DVC stage `teacher`: train the teacher on the full training split (kdsweep.pipeline.train_teacher)."""

from kdsweep import pipeline
from kdsweep.config import load_params

if __name__ == "__main__":
    pipeline.train_teacher(load_params())
