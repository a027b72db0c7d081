"""DVC stage `prepare`: build the splits and nested subset orders (kdsweep.data)."""

from kdsweep import pipeline
from kdsweep.config import load_params

if __name__ == "__main__":
    pipeline.prepare(load_params())
