"""Models, built by name from `kdsweep.registry.ARCHS`: one constructor for teachers and
students, so both sides of a comparison are built alike.

Every model exposes its last layer as `.head` (the `random_head` control re-initialises it) and
keeps no running statistics (GroupNorm, LayerNorm), so students stack under `torch.func.vmap`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from kdsweep.errors import KdsweepError
from kdsweep.registry import ARCHS


def build_model(arch: str, input_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
    """`arch` for inputs of `input_shape` (one sample's shape) and `num_classes` outputs."""
    rank = ARCHS[arch].input_rank
    if rank is not None and len(input_shape) != rank:
        raise KdsweepError(
            f"arch {arch} takes inputs of rank {rank}, got one of shape {tuple(input_shape)}"
        )
    try:
        return ARCHS.load(arch)(tuple(input_shape), num_classes, width)
    except ValueError as err:  # a width or shape the architecture cannot take
        raise KdsweepError(f"arch {arch}: {err}") from None


def n_params(model: nn.Module) -> int:
    """Trainable parameters of a model (the capacity axis of the report's By factor section)."""
    return sum(q.numel() for q in model.parameters())


_GLOBAL_RNG = threading.RLock()


@contextmanager
def global_seed(seed: int) -> Iterator[None]:
    """torch's global RNG seeded with `seed` for the block, which no other thread of this
    process seeds or draws from meanwhile: models initialise from it, and the local executor
    trains several stacks at once, each in a thread (students.executor)."""
    with _GLOBAL_RNG:
        torch.manual_seed(seed)
        yield


def reinit_head(model: nn.Module, seed: int) -> nn.Module:
    """The `random_head` control: same features, a freshly initialised last layer."""
    with global_seed(seed):
        model.head.reset_parameters()
    return model
