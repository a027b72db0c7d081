"""DVC stage `prepare`: build the splits and nested subset orders (kdsweep.data)."""

from kdsweep import pipeline
from kdsweep.config import load_params
from kdsweep.errors import explained_errors

if __name__ == "__main__":
    with explained_errors():
        pipeline.prepare(load_params())
