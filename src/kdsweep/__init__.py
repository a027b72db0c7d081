"""kdsweep: knowledge distillation as a function of dataset size, from cached teacher logits."""

__version__ = "0.1.0"
