"""K copies of a small model run at once as batched matrix products (students.stack).

Under `torch.func.vmap` a `Conv1d` of K students becomes one grouped convolution of K groups,
which oneDNN runs slowly for a student's narrow layers (16 channels: a few % of the CPU's
matmul peak, bench/bench_roofline.py). Here every layer is one `torch.bmm` per layer and tap
group over the K students instead: a linear layer is `baddbmm`, a stride-s convolution reads its
input, padded, as rows of s positions (a free view) and sums ceil(k/s) shifted products; the
activations between convolutions stay channels-last, [K, B, L, C]. Each student's values come
from its own slice of every product, so a student does not depend on the others of its stack.

`stacked_forward(model)` gives this forward for models whose `forward` is their `SEQUENTIAL`
submodules applied in order and whose layers are all `Conv1d` (groups 1, dilation 1, zero
padding), `Linear`, `ReLU` and `Flatten` (the MNIST-1D CNN and the MLP); for any other model it
gives None and the stack runs `vmap(functional_call)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

StackedForward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model's layers in forward order with their parameter prefixes, or None."""
    names = getattr(type(model), "SEQUENTIAL", None)
    if not names:
        return None
    out: list[tuple[str, nn.Module]] = []
    for name in names:
        mod = model.get_submodule(name)
        children = list(mod.named_children()) if isinstance(mod, nn.Sequential) else [("", mod)]
        for child, layer in children:
            if not _supported(layer):
                return None
            out.append((f"{name}.{child}." if child else f"{name}.", layer))
    return out


def _supported(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Conv1d):
        return (
            layer.groups == 1
            and layer.dilation == (1,)
            and layer.padding_mode == "zeros"
            and isinstance(layer.padding, tuple)
        )
    if isinstance(layer, nn.Flatten):
        return layer.start_dim == 1 and layer.end_dim == -1
    return isinstance(layer, (nn.Linear, nn.ReLU))


def stacked_forward(model: nn.Module) -> StackedForward | None:
    """forward(params {name: [K, ...]}, x [K, B, ...]) -> logits [K, B, classes] of K stacked
    copies of `model` (in train or eval mode alike: these layers have none), or None when the
    model has a layer without a rule here."""
    layers = _layers(model)
    if layers is None:
        return None

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h, layout = x, "model"  # "model": as the model sees it; "cl": [K, B, L, C]
        for prefix, layer in layers:
            if isinstance(layer, nn.Conv1d):
                if layout == "model":
                    h, layout = h.transpose(2, 3), "cl"
                w, b = params[prefix + "weight"], params.get(prefix + "bias")
                h = conv1d_cl(h, w, b, layer.stride[0], layer.padding[0])
            elif isinstance(layer, nn.ReLU):
                h = torch.relu(h)
            elif isinstance(layer, nn.Flatten):
                # the model flattens [B, C, L] channel-major: a channels-last activation
                # flattens position-major, and the next linear layer's columns follow it
                layout = ("flat_cl", h.shape[3], h.shape[2]) if layout == "cl" else "flat"
                h = h.flatten(2)
            else:  # nn.Linear
                w, b = params[prefix + "weight"], params.get(prefix + "bias")
                if isinstance(layout, tuple):
                    _, c, length = layout
                    w = w.view(len(w), -1, c, length).transpose(2, 3).reshape(w.shape)
                    layout = "flat"
                h = linear(h, w, b)
        return h

    return forward


def linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """K linear layers: h [K, B, in], w [K, out, in], b [K, out] -> [K, B, out]."""
    if b is None:
        return torch.bmm(h, w.transpose(1, 2))
    return torch.baddbmm(b[:, None], h, w.transpose(1, 2))


def conv1d_cl(
    h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int, padding: int
) -> torch.Tensor:
    """K 1-D convolutions, channels-last: h [K, B, L, C], w [K, C_out, C, k], b [K, C_out]
    -> [K, B, L_out, C_out].

    The input is read as rows of `stride` positions ([K, B·L/stride, stride·C], a view): tap j
    of output position t reads row t + δ at position r, where j − padding = δ·stride + r, so
    the taps of one δ are consecutive columns of a row. One product per δ (two for the strided
    3-tap layers: δ = −1, 0), each shifted by δ, zero where its row falls in the padding —
    the input is never padded or copied, and its gradient needs no scatter. An input that
    needs no gradient (the first layer) is unfolded instead: one product with all k·C
    columns."""
    k_, batch, length, c = h.shape
    c_out, k = w.shape[1], w.shape[3]
    out = (length + 2 * padding - k) // stride + 1
    if not h.requires_grad:  # im2col: one product, and no backward through the copy
        hp = F.pad(h, (0, 0, padding, padding))
        end = stride * (out - 1) + 1
        cols = torch.cat([hp[:, :, j : j + end : stride] for j in range(k)], -1)
        wm = w.permute(0, 3, 2, 1).reshape(k_, k * c, c_out)  # rows ordered (tap, channel)
        y = _bmm(cols.reshape(k_, batch * out, k * c), wm, b)
        return y.view(k_, batch, out, c_out)
    right = -length % stride  # whole groups of `stride` positions
    hg = F.pad(h, (0, 0, 0, right)) if right else h
    groups = (length + right) // stride
    grouped = hg.reshape(k_, batch * groups, stride * c)  # a view of a contiguous input
    offsets: dict[int, list[int]] = {}  # tap j reads group t + δ, position r: j − p = δ·s + r
    for j in range(k):
        offsets.setdefault((j - padding) // stride, []).append(j)
    full = [d for d in offsets if d >= 0 and out + d <= groups]  # covers every t: the bias
    y = None
    for d, taps in sorted(offsets.items()):
        r0 = (taps[0] - padding) % stride  # the taps' positions within a group: r0, r0 + 1, ...
        # contiguous: one tap's permuted slice is a view whose rows are neither row- nor
        # column-major, which bmm (and its backward) multiplies 1.3-1.6x slower
        wd = w[:, :, :, taps[0] : taps[-1] + 1].permute(0, 3, 2, 1).reshape(k_, -1, c_out)
        wd = wd.contiguous()
        cols = grouped[:, :, r0 * c : (r0 + len(taps)) * c]
        prod = _bmm(cols, wd, b if full and d == full[0] else None).view(k_, batch, groups, c_out)
        lo, hi = max(0, -d), min(out, groups - d)  # output positions whose group exists
        part = prod[:, :, lo + d : hi + d]
        if lo > 0 or hi < out:
            part = F.pad(part, (0, 0, lo, out - hi))
        y = part if y is None else y + part
    if b is not None and not full:
        y = y + b[:, None, None]
    return y


def _bmm(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.bmm(a, w) if b is None else torch.baddbmm(b[:, None], a, w)
