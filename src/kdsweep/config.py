"""params.yaml schema: every stage and the CLI load their parameters through `load_params`.

Validation happens once, on load, so a typo or an out-of-range value stops the pipeline before any
work is done, with a message that names the key, the value and what is allowed. Every name
(dataset, architecture, loss, cache kind, teacher, store, method) is checked against
`kdsweep.registry`, which is torch-free, so loading params never imports torch.

Tracing (for tests/test_deps.py): with KDSWEEP_TRACE=<dir> set, a process that loads params
records every params key it reads and every kdsweep module it imported into <dir>/<pid>.json at
exit, so a test can check that dvc.yaml declares all of them for the stage that ran.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import reprlib
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from kdsweep.errors import KdsweepError
from kdsweep.registry import (
    ARCHS,
    AUGMENTS,
    CACHE_KINDS,
    DATASETS,
    HYPER,
    LOSSES,
    Registry,
    augment_for,
)

STUDENTS_OF_LABELS = "labels"  # the student stage of methods that read no store


class ParamsError(KdsweepError):
    """Invalid params.yaml; the message lists every offending key."""


_READ: set[str] | None = None  # params keys read by this process, while tracing


class Strict(BaseModel):
    """Frozen, no unknown keys; knows its own path in params.yaml (`_path`) so that reads of its
    fields can be traced as dotted keys."""

    # allow_inf_nan: every float of params.yaml is finite (an infinite τ or margin is a typo)
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False
    )
    _path: str | None = PrivateAttr(None)  # set once the whole params tree is validated

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if _READ is not None and not name.startswith("_"):
            field = type(self).model_fields.get(name)
            private = super().__getattribute__("__pydantic_private__") or {}
            path = private.get("_path")
            if field is not None and path is not None and not _is_section(value):
                _READ.add(f"{path}{'.' if path else ''}{field.alias or name}")
        return value


def _is_section(value: Any) -> bool:
    """Sections record the keys read below them, not themselves."""
    if isinstance(value, Strict):
        return True
    return isinstance(value, dict) and any(isinstance(v, Strict) for v in value.values())


def _set_paths(model: Strict, path: str = "") -> None:
    model._path = path
    for name, field in type(model).model_fields.items():
        key = f"{path}{'.' if path else ''}{field.alias or name}"
        value = BaseModel.__getattribute__(model, name)
        if isinstance(value, Strict):
            _set_paths(value, key)
        elif isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, Strict):
                    _set_paths(v, f"{key}.{k}")


def _choice(kind: str, value: str, allowed: Any) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")


def registered(reg: Registry) -> Any:
    """The type of a params value that must name an entry of `reg`, checked when params load."""

    def check(value: str) -> str:
        _choice(reg.kind, value, reg)
        return value

    return Annotated[str, AfterValidator(check)]


NAME = r"^[a-z][a-z0-9_]{0,63}$"
Name = Annotated[str, Field(pattern=NAME)]
"""A name that reaches a path, a DVC stage name or a command (stores, methods): an identifier,
so that no value of params.yaml can carry a path separator or shell syntax (DESIGN.md §10)."""
Device = Literal["auto", "cpu", "cuda"]

# Lower bounds of the memory a value needs, so that an absurd size fails at load with its
# estimate instead of a MemoryError (or minutes of work) later: bytes of one input row by input
# rank (tokens, MNIST-1D rows, uint8 images) and of one parameter in training (weights, gradient,
# two Adam moments).
_ROW_BYTES = {1: 8, 2: 160, 3: 3 * 32 * 32}
_PARAM_BYTES = 16
MAX_CHUNK_ROWS = 2**24  # rows of one cache chunk or teacher batch, each held in memory whole


def machine_bytes() -> int:
    """Physical memory of this machine."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**40  # unknown: bound by 1 TiB


def _fits(key: str, value: int, need: float, what: str) -> None:
    """Refuse `key=value` if its lower-bound estimate `need` (bytes) exceeds this machine."""
    have = machine_bytes()
    if need > have:
        raise ValueError(
            f"{key}={value} needs at least {need / 2**30:,.1f} GiB ({what}), more than this "
            f"machine's {have / 2**30:,.1f} GiB of memory"
        )


def _unique(key: str, values: list[Any], allow_empty: bool = True) -> None:
    if not values and not allow_empty:
        raise ValueError(f"{key} must not be empty")
    dupes = sorted({str(v) for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"{key} lists {dupes} more than once")


class DataParams(Strict):
    """A dataset or text corpus of `kdsweep.registry.DATASETS`."""

    name: registered(DATASETS) = "mnist1d"
    n_train: int = Field(40000, gt=0)
    n_test: int = Field(10000, gt=0)
    seed: int = 0
    root: str | None = None
    download: bool = False
    # language track only
    path: str | None = None  # textfile: one file, documents separated by blank lines
    hf_name: str | None = None  # hf: a Hugging Face dataset name (needs `pip install datasets`)
    vocab_size: int = Field(1024, ge=258)
    seq_len: int = Field(64, gt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _source_fits(self) -> DataParams:
        d = DATASETS[self.name]
        if d.needs_root and self.root is None:
            raise ValueError(f"data.name={self.name!r} reads files from disk: set data.root")
        if self.download and not d.downloads:
            raise ValueError(
                f"data.name={self.name!r} cannot be downloaded: set data.download: false"
            )
        return self

    @property
    def task(self) -> str:
        return DATASETS[self.name].task


class TeacherParams(Strict):
    """One teacher of `teachers:`, trained on the full training split by its `teacher@<name>`
    stage. `head: random` re-initialises its last layer after training (the `random_head`
    control: the trained features, no class structure in the outputs)."""

    arch: str = "cnn1d"
    width: int = Field(64, gt=0)
    epochs: int = Field(20, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    device: Device = "auto"
    augment: bool = False  # train on fresh views of the data's augmentation family (AUGMENTS)
    head: Literal["trained", "random"] = "trained"


class Codec(Strict):
    name: Literal["blosc", "zstd", "none"] = "blosc"
    cname: Literal["zstd", "lz4", "lz4hc", "zlib", "blosclz"] = "zstd"
    clevel: int = Field(5, ge=0, le=22)
    shuffle: Literal["noshuffle", "shuffle", "bitshuffle"] = "shuffle"


class StoreParams(Strict):
    """One store: which teacher (of `teachers:`) it caches and in which kind (CACHE_KINDS).

    `views`: 1 trains on the clean inputs; V > 1 caches V augmented views per training row (the
    data's augmentation family, `registry.AUGMENTS`) and its students replay them; "fresh" (kind
    `online` only) gives every step a fresh augmented view, labelled by the teacher on the spot.
    `draws` (kind `sampled`): R independent draw sets per row, one picked per row per step."""

    teacher: str  # required: DVC tracks it (the store's stage depends on that checkpoint)
    kind: registered(CACHE_KINDS) = "full"
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    k: int | None = Field(None, gt=0)
    sample_seed: int = 0
    tau: float = Field(1.0, gt=0)  # kind sampled only: draws from softmax(logits / tau)
    draws: int = Field(1, ge=1)  # kind sampled only: independent draw sets per row
    views: Annotated[int, Field(ge=1)] | Literal["fresh"] = 1

    @model_validator(mode="after")
    def _known_and_k_matches_kind(self) -> StoreParams:
        for key in ("tau", "draws"):
            if key in self.model_fields_set and self.kind != "sampled":
                raise ValueError(
                    f"{key}={getattr(self, key)} is meaningful only for kind 'sampled' (its "
                    f"draws), not {self.kind!r}"
                    + (": set tau on the methods instead" if key == "tau" else "")
                )
        online = self.kind == "online"
        if online and self.views not in (1, "fresh"):
            raise ValueError(
                f"views={self.views!r}: an online teacher labels each step's own input, so its "
                "store takes views 1 (clean inputs) or 'fresh' (a fresh augmented view per step)"
            )
        if self.views == "fresh" and not online:
            raise ValueError(
                f"views='fresh' needs the teacher at every step (kind 'online'), not "
                f"{self.kind!r}: a cache holds a fixed number of views (views: V)"
            )
        needs_k = CACHE_KINDS[self.kind].needs_k
        if not needs_k and self.k is not None:
            raise ValueError(f"k={self.k} is meaningless for kind {self.kind!r}")
        if needs_k and self.k is None:
            raise ValueError(f"kind {self.kind!r} needs k (a positive integer)")
        return self

    @property
    def augmented(self) -> bool:
        """Whether its students see augmented views (cached or fresh)."""
        return self.views != 1


class CacheParams(Strict):
    codec: Codec = Codec()
    chunk_rows: int = Field(8192, gt=0)
    batch_size: int = Field(1024, gt=0)
    aug_seed: int = 0  # seeds the cached views of every store (`views` > 1)
    stores: dict[Name, StoreParams]
    reference: Name = "full"  # the store whose test split measures agreement and KL

    @model_validator(mode="after")
    def _has_reference(self) -> CacheParams:
        if self.reference not in self.stores:
            raise ValueError(
                f"cache.reference={self.reference!r} is not one of cache.stores ({', '.join(self.stores)})"
            )
        return self


class Budget(Strict):
    """`value` steps (mode steps) or epochs of the subset (mode epochs), and never fewer than
    `min_epochs` passes over the subset: equal steps alone starve the large α. `select`: the
    student is its `last` step, or (`best_val`) its checkpoint of lowest validation loss,
    evaluated every `eval_every` steps and at the end (`train.BestVal`)."""

    mode: Literal["epochs", "steps"] = "steps"
    value: int = Field(1500, gt=0)
    min_epochs: int = Field(0, ge=0)
    select: Literal["last", "best_val"] = "last"
    eval_every: int = Field(100, gt=0)


class DaskParams(Strict):
    """`student.executor: dask`: an existing scheduler at `address` (e.g. one dask-jobqueue
    started), or a LocalCluster of `workers` processes (0: one per GPU, else 2)."""

    address: str | None = None
    workers: int = Field(0, ge=0)


class StudentParams(Strict):
    """`student:` — what every student shares (where and how it trains), and the defaults of
    the recipe fields (RECIPE) that each configuration of `students:` may override."""

    arch: str = "cnn1d"
    width: int = Field(64, gt=0)
    budget: Budget = Budget()
    val_fraction: float = Field(0.1, gt=0, le=0.5)  # of each subset, for selection (never test)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    train_seeds: list[int] = [0]
    device: Device = "auto"
    stacked: Literal["auto", "on", "off"] = "auto"
    # torch.compile of a stacked step (students.plan.choose_compile): auto compiles where the
    # measured saving outweighs the compile time; it changes rounding (part of a student's key)
    compile: Literal["auto", "on", "off"] = "auto"
    threads: int = Field(0, ge=0)  # torch CPU threads per stack; 0: its worker's share of cores
    # stacks the local executor trains at once (threads of the stage process); 0: one per
    # `threads` cores on a CPU, one on a GPU (students.plan.local_workers)
    workers: int = Field(0, ge=0)
    executor: Literal["local", "dask"] = "local"  # where stacks train (kdsweep.students.executor)
    dask: DaskParams = DaskParams()

    def recipe(self) -> dict[str, Any]:
        """The fields that decide what a student learns — not where, with how many threads or
        beside which others it trains (those are recorded per student where they matter)."""
        placement = {
            "device",
            "stacked",
            "compile",
            "threads",
            "workers",
            "executor",
            "dask",
            "train_seeds",
        }
        return self.model_dump(mode="json", by_alias=True, exclude=placement)


RECIPE = ("arch", "width", "budget", "batch_size", "lr", "weight_decay")
"""The fields of a student configuration: what `students.<name>` may set over `student:`."""


class StudentConfig(Strict):
    """One named student configuration (`students.<name>`): the recipe fields it changes from
    `student:`; `{}` is `student:` itself."""

    arch: str | None = None
    width: int | None = Field(None, gt=0)
    budget: Budget | None = None
    batch_size: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)


Unit = Annotated[float, Field(ge=0, le=1)]
Tau = Annotated[float, Field(gt=0)]


class MethodParams(Strict):
    """One student recipe. `loss` (LOSSES) defaults to the method's own name in params.yaml."""

    loss: registered(LOSSES)
    lam: Unit = Field(1.0, alias="lambda")
    tau: Tau | list[Tau] = 1.0
    epsilon: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # which store(s) of cache.stores: a list trains the method once per store (and so per
    # teacher, the teacher axis of the report); default: cache.reference
    cache: Name | list[Name] | None = None
    topk_mode: Literal["tail", "spread", "renorm"] = "tail"  # TopK.distill: the tail model

    @model_validator(mode="after")
    def _hyper_used_by_loss(self) -> MethodParams:
        uses = LOSSES[self.loss].hyper
        set_ = {type(self).model_fields[f].alias or f for f in self.model_fields_set}
        unused = sorted(set_ & set(HYPER) - set(uses))
        if unused:
            raise ValueError(
                f"loss {self.loss!r} does not use {unused} (it reads: {', '.join(uses) or 'none'})"
            )
        return self

    @property
    def uses_teacher(self) -> bool:
        return LOSSES[self.loss].needs_teacher

    @property
    def taus(self) -> list[float]:
        return list(self.tau) if isinstance(self.tau, list) else [self.tau]


class SweepParams(Strict):
    """Which students train: `methods` at every alpha, by each configuration that `students`
    maps to `all` of them or to a list of them (default: every configuration of `students:`,
    all methods); `ablation_methods` at `ablation_alphas` only, by each of `ablation_students`
    (default: the first configuration of `students`)."""

    methods: list[str]
    ablation_alphas: list[Annotated[float, Field(gt=0, le=1)]] = []
    ablation_methods: list[str] = []
    students: dict[str, Literal["all"] | list[str]] | None = None
    ablation_students: list[str] | None = None


class AnalysisParams(Strict):
    """How kdsweep.analysis reads the runs: baseline and reference methods, the controls compared
    with the reference, the confidence level of every interval (and 1 − ci the level of every
    test, Holm-adjusted within a hypothesis), how a swept τ is selected (`select`: per α on that
    α's validation rows, or one τ for every α), and the equivalence margin: a control "matches"
    only if two one-sided tests put the difference within ±margin, where the margin is
    `equivalence_fraction` of the reference's gain over the baseline at that α (score units) or,
    with `equivalence_fraction: null`, the fixed `equivalence_margin`. Nothing resamples (the
    multiplier's interval is a jackknife over seeds), so there is no bootstrap size or seed."""

    baseline: str = "ce"
    reference: str = "kd"
    controls: list[str] = []
    select: Literal["per_alpha", "global"] = "per_alpha"
    ci: float = Field(0.95, gt=0, lt=1)
    equivalence_margin: float = Field(0.01, gt=0)
    equivalence_fraction: float | None = Field(0.1, gt=0, lt=1)


class Params(Strict):
    track: Name = "default"  # which conf/track/<name>.yaml this is (a label for `dvc exp show`)
    data: DataParams = DataParams()
    alphas: list[float]
    subset_seeds: list[int] = [0]
    teachers: dict[Name, TeacherParams]
    cache: CacheParams
    student: StudentParams = StudentParams()
    students: dict[Name, StudentConfig]
    methods: dict[Name, MethodParams]
    sweep: SweepParams
    analysis: AnalysisParams = AnalysisParams()

    def stores_of(self, method: str) -> list[str]:
        """The cache stores a method reads (one student per store): its own `cache`, else
        `cache.reference`."""
        c = self.methods[method].cache
        return c if isinstance(c, list) else [c or self.cache.reference]

    def stores_or_none(self, method: str) -> list[str | None]:
        """The stores a method reads, or [None] for a method of labels only."""
        return self.stores_of(method) if self.methods[method].uses_teacher else [None]

    def alphas_of(self, method: str) -> list[float]:
        """The α a method trains at: `alphas` for the main sweep, else `sweep.ablation_alphas`."""
        return self.alphas if method in self.sweep.methods else self.sweep.ablation_alphas

    def students_of(self, method: str) -> list[str]:
        """The student configurations a method trains: `sweep.students` (default: all) for the
        main sweep, else `sweep.ablation_students` (default: the first of those)."""
        chosen = self.sweep.students or dict.fromkeys(self.students, "all")
        if method in self.sweep.methods:
            return [s for s, ms in chosen.items() if ms == "all" or method in ms]
        return self.sweep.ablation_students or list(chosen)[:1]

    def student_config(self, name: str) -> StudentParams:
        """Student configuration `name`: `student:` with the fields `students.<name>` sets."""
        over = self.students[name].model_dump(exclude_none=True)
        return self.student.model_copy(update={k: getattr(self.students[name], k) for k in over})

    def methods_reading(self, store: str | None) -> list[str]:
        """The swept methods that read `store` (None: those of labels only), in sweep order."""
        swept = [*self.sweep.methods, *self.sweep.ablation_methods]
        return [m for m in swept if store in self.stores_or_none(m)]

    @field_validator("alphas")
    @classmethod
    def _alphas_in_unit_interval(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not (0 < a <= 1) or math.isnan(a)]
        if bad:
            raise ValueError(f"every alpha must lie in (0, 1]; got {bad}")
        _unique("alphas", v, allow_empty=False)
        return sorted(v)

    @model_validator(mode="before")
    @classmethod
    def _default_loss_to_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("methods"), dict):
            methods = {}
            for name, m in data["methods"].items():
                if not isinstance(m, dict | None):
                    methods[name] = m  # pydantic names the key and the expected mapping
                    continue
                m = dict(m or {})
                if "loss" not in m:
                    if name not in LOSSES:
                        raise ValueError(
                            f"methods.{name}: unknown method; name it after a loss "
                            f"({', '.join(LOSSES)}) or give it a 'loss' key"
                        )
                    m["loss"] = name
                methods[name] = m
            data = {**data, "methods": methods}
        return data

    @model_validator(mode="after")
    def _references_exist(self) -> Params:
        _choice("cache.reference store", self.cache.reference, self.cache.stores)
        if STUDENTS_OF_LABELS in self.cache.stores:
            raise ValueError(f"cache.stores: {STUDENTS_OF_LABELS!r} names the label-only students")
        if not self.teachers:
            raise ValueError("teachers: name at least one teacher")
        for name, t in self.teachers.items():
            _check_arch(f"teachers.{name}.arch", t.arch, self.data.name)
        for name, store in self.cache.stores.items():
            _choice(f"cache.stores.{name}.teacher", store.teacher, self.teachers)
        rank = DATASETS[self.data.name].input_rank
        augmented = [f"cache.stores.{n}.views" for n, s in self.cache.stores.items() if s.augmented]
        augmented += [f"teachers.{n}.augment" for n, t in self.teachers.items() if t.augment]
        for key in augmented:
            if augment_for(rank) is None:
                raise ValueError(
                    f"{key}: data.name={self.data.name!r} (inputs of rank {rank}) has no "
                    f"augmentation family ({', '.join(AUGMENTS)}): use clean inputs"
                )
        if not self.students:
            raise ValueError("students: name at least one student configuration ({} is student:)")
        for name, over in self.students.items():  # the key the user wrote the arch under
            key = f"students.{name}.arch" if over.arch is not None else "student.arch"
            _check_arch(key, self.student_config(name).arch, self.data.name)
        _unique("subset_seeds", self.subset_seeds, allow_empty=False)
        _unique("student.train_seeds", self.student.train_seeds, allow_empty=False)
        for name, m in self.methods.items():
            caches = m.cache if isinstance(m.cache, list) else [m.cache] * (m.cache is not None)
            _unique(f"methods.{name}.cache", caches)
            for c in caches:
                _choice(f"methods.{name}.cache store", c, self.cache.stores)
            _unique(f"methods.{name}.tau", m.taus)
            loss = LOSSES[m.loss]
            for s in self.stores_of(name) if m.uses_teacher else []:
                store = self.cache.stores[s]
                if store.kind not in loss.kinds:
                    raise ValueError(
                        f"methods.{name}: loss {m.loss!r} reads caches of kind "
                        f"{', '.join(loss.kinds)}, not store {s!r} ({store.kind})"
                    )
                if store.kind == "sampled" and m.taus != [store.tau]:
                    raise ValueError(
                        f"methods.{name}.tau={m.tau}: store {s!r} holds draws from the teacher "
                        f"at cache.stores.{s}.tau={store.tau:g}, so its students must train at "
                        f"exactly that tau (set methods.{name}.tau: {store.tau:g}, or change "
                        f"cache.stores.{s}.tau)"
                    )
        for key in ("students", "ablation_students"):
            names = getattr(self.sweep, key)
            if names is not None:
                _unique(f"sweep.{key}", list(names), allow_empty=False)
                unknown = [n for n in names if n not in self.students]
                if unknown:
                    raise ValueError(f"sweep.{key} names {unknown}, not defined under students")
        for name, ms in (self.sweep.students or {}).items():
            if ms != "all":
                _unique(f"sweep.students.{name}", ms, allow_empty=False)
                if stray := [m for m in ms if m not in self.sweep.methods]:
                    raise ValueError(f"sweep.students.{name} names {stray}, not in sweep.methods")
        for key in ("methods", "ablation_methods"):
            names = getattr(self.sweep, key)
            _unique(f"sweep.{key}", names, allow_empty=key != "methods")
            unknown = [n for n in names if n not in self.methods]
            if unknown:
                raise ValueError(f"sweep.{key} names {unknown}, not defined under methods")
        _unique("sweep.ablation_alphas", self.sweep.ablation_alphas)
        both = sorted(set(self.sweep.methods) & set(self.sweep.ablation_methods))
        if both:
            raise ValueError(f"{both} are in both sweep.methods and sweep.ablation_methods")
        if bool(self.sweep.ablation_alphas) != bool(self.sweep.ablation_methods):
            raise ValueError(
                "sweep.ablation_alphas and sweep.ablation_methods must both be set or both be "
                f"empty (got {self.sweep.ablation_alphas} and {self.sweep.ablation_methods})"
            )
        a = self.analysis
        for key, name in (("baseline", a.baseline), ("reference", a.reference)):
            _choice(f"analysis.{key} method", name, self.methods)
        for name in a.controls:
            _choice("analysis.controls method", name, self.methods)
        _unique("analysis.controls", a.controls)
        self._sizes_fit()
        _set_paths(self)
        return self

    def _sizes_fit(self) -> None:
        """Sizes bounded by what this machine can hold, checked before any work."""
        d = self.data
        rows = d.n_train + d.n_test
        per_row = _ROW_BYTES[DATASETS[d.name].input_rank]
        _fits(
            "data.n_train",
            d.n_train,
            rows * per_row,
            f"{rows:,} rows with n_test, ≥ {per_row} B each",
        )
        widths = [(f"teachers.{n}.width", t.width) for n, t in self.teachers.items()]
        widths += [(f"students.{n}.width", s.width) for n, s in self.students.items() if s.width]
        for key, width in [("student.width", self.student.width), *widths]:
            _fits(key, width, _PARAM_BYTES * width**2, f"a {width}x{width} layer in training")
        for key, n in (
            ("cache.chunk_rows", self.cache.chunk_rows),
            ("cache.batch_size", self.cache.batch_size),
        ):
            if n > MAX_CHUNK_ROWS:
                raise ValueError(
                    f"{key}={n} exceeds {MAX_CHUNK_ROWS:,} rows: each is held in memory whole "
                    "(DESIGN.md §4: chunks of ≥ 8192 rows are enough for fast reads)"
                )


def _check_arch(key: str, arch: str, dataset: str) -> None:
    _choice(f"{key} architecture", arch, ARCHS)
    want, have = ARCHS[arch].input_rank, DATASETS[dataset].input_rank
    if want is not None and want != have:
        raise ValueError(
            f"{key}={arch!r} takes inputs of rank {want}, but data.name={dataset!r} has rank "
            f"{have}; pick one of {', '.join(a for a in ARCHS if ARCHS[a].input_rank in (None, have))}"
        )


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 2, 6, 6, 80, 80
"""Shows a bad value briefly: a message never grows with the value (a huge list, a bomb)."""


class _StrictLoader(yaml.SafeLoader):
    """YAML without aliases (a few bytes of `&a [*a, *a, …]` nest into gigabytes) and without
    duplicate keys (where the last would silently win; DVC refuses them too)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor}: aliases are not allowed", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict) or key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate or unhashable key {_SHORT.repr(key)}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    """A YAML file through `_StrictLoader`; a ParamsError naming the file otherwise."""
    try:
        loader = _StrictLoader(Path(path).read_text(encoding="utf-8"))
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path} cannot be read as UTF-8 text: {err}") from None


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml's documented keys)"
        elif e["type"] == "string_pattern_mismatch" and e["ctx"]["pattern"] == NAME:
            msg = (
                "not an identifier (a lowercase letter, then lowercase letters, digits or _; at "
                "most 64): names become paths, DVC stage names and command arguments"
            )
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {_SHORT.repr(value)})"
        lines.append(f"  {key}: {msg}{shown}")
    return "invalid params:\n" + "\n".join(lines)


def parse_params(raw: dict[str, Any]) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_errors(err)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    if os.environ.get("KDSWEEP_TRACE"):
        _start_trace(Path(os.environ["KDSWEEP_TRACE"]))
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found: run from the repository root")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw)


def params_hash(*sections: Any) -> str:
    """Short stable hash of the params that define a run (recorded in runs.parquet)."""
    if _READ is not None:  # a dump reads every key of the section
        _READ.update(s._path for s in sections if isinstance(s, Strict))
    blob = json.dumps(
        [
            s.model_dump(mode="json", by_alias=True) if isinstance(s, BaseModel) else s
            for s in sections
        ],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _start_trace(out_dir: Path) -> None:
    """Record the params keys this process reads and the kdsweep modules it imports."""
    global _READ
    if _READ is not None:
        return
    _READ = set()
    read = _READ

    def dump() -> None:
        modules = sorted(m for m in sys.modules if m == "kdsweep" or m.startswith("kdsweep."))
        out_dir.mkdir(parents=True, exist_ok=True)
        record = {"argv": sys.argv, "keys": sorted(read), "modules": modules}
        (out_dir / f"{os.getpid()}.json").write_text(json.dumps(record, indent=1))

    atexit.register(dump)
