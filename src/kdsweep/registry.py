"""Every extension point of kdsweep, in one torch-free place (as timm registers models and
torchdistill registers losses).

A registry maps a name, as written in params.yaml, to an entry: what the config validation needs
to know about it (plain data, no torch) and `impl`, the "module:attribute" of its code, imported
only when a stage calls `REGISTRY.load(name)`. So `kdsweep.config` checks every name and its
compatibility before any work without importing torch, and adding an extension is one function
(or class) plus one `register(...)` line below. Tests are parametrised over these registries.

Dependency rule (used by `kdsweep.deps` to keep dvc.yaml complete): a module that calls
`<REGISTRY>.load(` depends on the `impl` modules of every entry of that registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from kdsweep.errors import KdsweepError


@dataclass(frozen=True)
class Entry:
    name: str
    impl: str  # "package.module:attribute"
    doc: str

    @property
    def module(self) -> str:
        return self.impl.split(":")[0]


E = TypeVar("E", bound=Entry)


class Registry(Generic[E]):
    """Named entries of one kind; `load` imports an entry's implementation on first use."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, E] = {}

    def register(self, entry: E) -> E:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __getitem__(self, name: str) -> E:
        if name not in self._entries:
            raise KdsweepError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self._entries)}"
            )
        return self._entries[name]

    def entries(self) -> list[E]:
        return list(self._entries.values())

    def load(self, name: str) -> Any:
        module, attr = self[name].impl.split(":")
        return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------------------------------------
# Datasets and corpora: impl(p: DataParams) -> kdsweep.data.splits.Splits


@dataclass(frozen=True)
class Dataset(Entry):
    task: Literal["vision", "lm"] = "vision"
    input_rank: int = 3  # dims of one input: 2 (channels, length), 3 (C, H, W), 1 (tokens)
    needs_root: bool = False  # reads files under data.root (torchvision formats)
    downloads: bool = False  # can fetch with data.download: true (never by default)


DATASETS: Registry[Dataset] = Registry("dataset")
_SRC, _IMG, _TXT = "kdsweep.data.sources", "kdsweep.data.images", "kdsweep.data.text"
for _name, _doc in (
    ("mnist1d", "MNIST-1D, generated locally by the mnist1d package"),
    ("digits", "scikit-learn's bundled 8x8 digits"),
):
    DATASETS.register(
        Dataset(_name, f"{_SRC}:{_name}", _doc, input_rank=2 if _name == "mnist1d" else 3)
    )
for _name in ("cifar10", "cifar100", "mnist", "fashionmnist", "svhn"):
    DATASETS.register(
        Dataset(
            _name,
            f"{_IMG}:torchvision_splits",
            f"torchvision {_name}",
            needs_root=True,
            downloads=True,
        )
    )
DATASETS.register(
    Dataset(
        "imagefolder", f"{_IMG}:torchvision_splits", "root/{train,test}/<class>/*", needs_root=True
    )
)
for _name, _doc in (
    ("pydoc", "the English help texts CPython ships (pydoc_data): offline"),
    ("stdlib", "the standard library's top-level modules (~4.7 MB of Python): offline"),
    ("textfile", "one text file (data.path), documents separated by blank lines"),
    ("hf", "a Hugging Face dataset (data.hf_name; needs `datasets` and network)"),
):
    DATASETS.register(
        Dataset(_name, f"{_TXT}:{_name}", _doc, task="lm", input_rank=1, downloads=_name == "hf")
    )


# ---------------------------------------------------------------------------------------------
# Architectures: impl(input_shape, num_classes, width) -> nn.Module with a `.head` last layer


@dataclass(frozen=True)
class Arch(Entry):
    input_rank: int | None = None  # None: any input shape (flattened)
    vmappable: bool = True  # stacks under torch.func.vmap on a CPU (DESIGN.md §7)


ARCHS: Registry[Arch] = Registry("architecture")
ARCHS.register(Arch("cnn1d", "kdsweep.models.basic:cnn1d", "MNIST-1D conv baseline", 2))
ARCHS.register(Arch("mlp", "kdsweep.models.basic:mlp", "two hidden layers, any input"))
for _name, _doc in (
    ("resnet20", "CIFAR ResNet-20, GroupNorm"),
    ("resnet56", "CIFAR ResNet-56, GroupNorm"),
    ("resnet18", "torchvision ResNet-18 for 32x32, GroupNorm, width 64"),
):
    ARCHS.register(Arch(_name, f"kdsweep.models.vision:{_name}", _doc, 3))
# the CPU attention kernel has no vmap rule: stacked transformers would loop anyway
ARCHS.register(Arch("vit", "kdsweep.models.vision:vit", "small ViT, 4x4 patches", 3, False))
ARCHS.register(Arch("gpt", "kdsweep.models.sequence:gpt", "GPT, depth 2", 1, False))
ARCHS.register(Arch("gpt-small", "kdsweep.models.sequence:gpt_small", "GPT, depth 4", 1, False))


# ---------------------------------------------------------------------------------------------
# Cache kinds: impl is a class with the arrays, encode, decode and distillation term of the kind
# (kdsweep.cache.kinds.CacheKind)


@dataclass(frozen=True)
class CacheKindEntry(Entry):
    needs_k: bool = False


CACHE_KINDS: Registry[CacheKindEntry] = Registry("cache kind")
CACHE_KINDS.register(CacheKindEntry("full", "kdsweep.cache.kinds:Full", "all C logits per row"))
CACHE_KINDS.register(
    CacheKindEntry("topk", "kdsweep.cache.kinds:TopK", "k largest logits + tail", True)
)
CACHE_KINDS.register(
    CacheKindEntry("sampled", "kdsweep.cache.kinds:Sampled", "k draws from p_T", True)
)
CACHE_KINDS.register(
    CacheKindEntry(
        "online",
        "kdsweep.cache.kinds:Online",
        "no training rows: the teacher runs on every batch (the reference caches are measured against)",
    )
)


# ---------------------------------------------------------------------------------------------
# Augmentation families: impl is an object with draw(n, views, seed) -> aug[n, views, 3] and
# apply(x, aug[n, 3]) -> views (kdsweep.augment); one family per input rank


@dataclass(frozen=True)
class Augment(Entry):
    input_rank: int = 3


AUGMENTS: Registry[Augment] = Registry("augmentation")
AUGMENTS.register(Augment("crop_flip", "kdsweep.augment:CROP_FLIP", "random crop + flip", 3))
AUGMENTS.register(
    Augment(
        "shift_scale_noise",
        "kdsweep.augment:SHIFT_SCALE_NOISE",
        "circular shift, amplitude scale, additive noise (MNIST-1D)",
        2,
    )
)


def augment_for(input_rank: int) -> str | None:
    """The augmentation family for inputs of `input_rank`, or None."""
    return next((e.name for e in AUGMENTS.entries() if e.input_rank == input_rank), None)


# ---------------------------------------------------------------------------------------------
# Losses and hypothesis controls (DESIGN.md §5)
#
# A student loss is  λ·distill(targets, z, τ) + (1 − λ)·CE(labels, z)  where
#   impl:     the transform of the cached teacher logits into the targets (a control's whole
#             definition, built at the training τ; `identity` for the rest):
#             (logits, y, epsilon, seed, tau) -> logits;
#   distill:  "kl" (τ²·KL through the cache kind's own term), "mse" (logit MSE, τ → ∞) or None;
#   labels:   "true" or "teacher" (the teacher's argmax as a hard label).
# Losses with the same (distill, label smoothing) compute the same function and share a stack.


@dataclass(frozen=True)
class Loss(Entry):
    distill: Literal["kl", "mse"] | None = None
    labels: Literal["true", "teacher"] = "true"
    hyper: tuple[str, ...] = ()  # which of lambda, tau, epsilon, topk_mode the loss reads
    kinds: tuple[str, ...] = ("full",)  # cache kinds it can read (when it reads one)
    smooth_labels: bool = False  # epsilon smooths the CE labels
    # what a control tests (Tang et al. 2020's split of KD): universal smoothing, instance-specific
    # confidence without class structure, or class relationships (kdsweep.analysis reads it)
    hypothesis: Literal["label_smoothing", "confidence", "dark_knowledge"] | None = None

    @property
    def is_control(self) -> bool:
        """Transforms the cached teacher targets (impl is not the identity)."""
        return not self.impl.endswith(":identity")

    @property
    def needs_teacher(self) -> bool:
        return self.distill is not None or self.labels == "teacher" or self.is_control


LOSSES: Registry[Loss] = Registry("loss")
_C = "kdsweep.controls"
_KD = ("lambda", "tau")
LOSSES.register(Loss("ce", f"{_C}:identity", "cross-entropy on labels", labels="true"))
LOSSES.register(
    Loss(
        "ls",
        f"{_C}:identity",
        "label smoothing (ε)",
        hyper=("epsilon",),
        smooth_labels=True,
        hypothesis="label_smoothing",
    )
)
LOSSES.register(
    Loss(
        "kd",
        f"{_C}:identity",
        "λ·τ²·KL(p_T^τ‖p_S^τ) + (1−λ)·CE",
        distill="kl",
        hyper=(*_KD, "topk_mode"),
        kinds=("full", "topk", "sampled", "online"),
    )
)
LOSSES.register(
    Loss(
        "logit_mse",
        f"{_C}:identity",
        "τ→∞ limit: logit MSE",
        distill="mse",
        hyper=("lambda",),
        kinds=("full", "online"),
    )
)
LOSSES.register(
    Loss(
        "ls_teacher",
        f"{_C}:ls_teacher",
        "one-hot smoothed by the teacher's mean non-target mass ε̄ at τ, as the teacher",
        distill="kl",
        hyper=_KD,
        hypothesis="label_smoothing",
    )
)
LOSSES.register(
    Loss(
        "ls_matched",
        f"{_C}:ls_matched",
        "teacher's target mass p_T^τ(y|x) at τ, the rest uniform",
        distill="kl",
        hyper=_KD,
        hypothesis="confidence",
    )
)
LOSSES.register(
    Loss(
        "shuffled_dk",
        f"{_C}:shuffled_dk",
        "teacher's non-target logits permuted per sample",
        distill="kl",
        hyper=_KD,
        hypothesis="dark_knowledge",
    )
)
LOSSES.register(
    Loss("top1_teacher", f"{_C}:identity", "teacher's argmax as a hard label", labels="teacher")
)
HYPER = ("lambda", "tau", "epsilon", "topk_mode")  # method keys a loss may declare in `hyper`
