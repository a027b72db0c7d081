"""kdsweep.softmax equals torch's softmax, log-softmax and cross-entropy (values and gradients),
at the extremes training reaches: margins of 20-30, one class, bfloat16, under vmap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import vmap

from kdsweep import softmax as S


def _logits(seed: int, rows: int, classes: int, scale: float, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(rows, classes, generator=g, dtype=torch.float64)
    z[0, 0] += 30.0  # a margin of 30: probabilities down to e^-30 and below
    return z.to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    rows=st.integers(1, 70),
    classes=st.integers(1, 40),
    scale=st.sampled_from([0.1, 1.0, 10.0, 25.0]),
    eps=st.sampled_from([0.0, 0.1, 0.3]),
)
def test_equal_to_torch_with_gradients(seed, rows, classes, scale, eps):
    z = _logits(seed, rows, classes, scale).requires_grad_()
    y = torch.randint(0, classes, (rows,), generator=torch.Generator().manual_seed(seed))
    for ours, theirs in [
        (S.softmax, lambda x: torch.softmax(x, -1)),
        (S.log_softmax, lambda x: torch.log_softmax(x, -1)),
        (
            lambda x: S.cross_entropy(x, y, eps),
            lambda x: F.cross_entropy(x, y, reduction="none", label_smoothing=eps),
        ),
    ]:
        a, b = ours(z), theirs(z)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        w = torch.randn(a.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=a.dtype)
        (ga,) = torch.autograd.grad((a * w).sum(), z)
        (gb,) = torch.autograd.grad((b * w).sum(), z)
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_and_leading_dims(dtype):
    z = _logits(0, 4 * 128, 10, 8.0, dtype).view(4, 128, 10)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(S.log_softmax(z), torch.log_softmax(z, -1), **tol)
    torch.testing.assert_close(S.softmax(z), torch.softmax(z, -1), **tol)
    assert S.softmax(z).dtype == dtype and S.softmax(z).shape == z.shape


def test_under_vmap_as_a_stack_calls_it():
    z = _logits(1, 3 * 64, 10, 5.0, torch.float32).view(3, 64, 10)
    y = torch.randint(0, 10, (3, 64), generator=torch.Generator().manual_seed(2))
    stacked = vmap(lambda a, b: S.cross_entropy(a, b, 0.1))(z, y)
    alone = torch.stack(
        [
            F.cross_entropy(a, b, reduction="none", label_smoothing=0.1)
            for a, b in zip(z, y, strict=True)
        ]
    )
    torch.testing.assert_close(stacked, alone)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_a_row_s_value_does_not_depend_on_the_other_rows(dtype):
    """Bit for bit, forward and backward, whatever the number of rows beside it (a stacked
    student's loss and validation curve must not depend on its stack's size: torch's kernel
    treats a last partial vector of columns apart, which the padding avoids)."""
    z = _logits(3, 300, 10, 7.0, dtype)
    y = torch.randint(0, 10, (300,), generator=torch.Generator().manual_seed(4))

    def run(n: int) -> tuple[torch.Tensor, ...]:
        x = z[:n].clone().requires_grad_()
        out = [S.softmax(x), S.log_softmax(x), S.cross_entropy(x, y[:n], 0.1)]
        (g,) = torch.autograd.grad(sum(o.sum() for o in out), x)
        return (*(o.detach() for o in out), g)

    full = run(300)
    for n in [1, 7, 15, 16, 17, 63, 64, 65, 129, 299]:
        for a, b in zip(run(n), full, strict=True):
            assert torch.equal(a, b[:n]), n


def test_wide_class_dimensions_use_torch_s_own_kernel(monkeypatch):
    """At 16 classes and more the last-dimension kernel is the faster one: it is what runs."""
    calls = []
    real = torch.log_softmax
    monkeypatch.setattr(torch, "log_softmax", lambda x, d: calls.append(d) or real(x, d))
    S.log_softmax(torch.zeros(5, 16))
    S.log_softmax(torch.zeros(5, 15))
    assert calls == [-1, 0]
