"""params.yaml schema: every stage and the CLI load their parameters through `load_params`.

Validation happens once, on load, so a typo or an out-of-range value stops the pipeline before any
work is done, with a message that names the key, the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdsweep.errors import KdsweepError

LOSSES = (
    "ce",
    "ls",
    "kd",
    "logit_mse",
    "ls_teacher",
    "ls_matched",
    "shuffled_dk",
    "top1_teacher",
)


class ParamsError(KdsweepError):
    """Invalid params.yaml; the message lists every offending key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


LM_SOURCES = ("pydoc", "stdlib", "textfile", "hf")
VISION_DATASETS = (
    "mnist1d",
    "digits",
    "cifar10",
    "cifar100",
    "mnist",
    "fashionmnist",
    "svhn",
    "imagefolder",
)


class DataParams(Strict):
    """A vision dataset, or (names in LM_SOURCES) a text corpus for the language-model track."""

    name: Literal[(*VISION_DATASETS, *LM_SOURCES)] = "mnist1d"  # type: ignore[valid-type]
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

    @property
    def task(self) -> str:
        return "lm" if self.name in LM_SOURCES else "vision"


class TeacherParams(Strict):
    arch: str = "cnn1d"
    width: int = Field(64, gt=0)
    epochs: int = Field(20, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    device: str = "auto"


class Codec(Strict):
    name: Literal["blosc", "zstd", "none"] = "blosc"
    cname: Literal["zstd", "lz4", "lz4hc", "zlib", "blosclz"] = "zstd"
    clevel: int = Field(5, ge=0, le=22)
    shuffle: Literal["noshuffle", "shuffle", "bitshuffle"] = "shuffle"


class StoreParams(Strict):
    teacher: Literal["main", "random_head"] = "main"
    kind: Literal["full", "topk", "sampled"] = "full"
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    k: int | None = Field(None, gt=0)
    sample_seed: int = 0

    @model_validator(mode="after")
    def _k_matches_kind(self) -> StoreParams:
        if self.kind == "full" and self.k is not None:
            raise ValueError(f"k={self.k} is only meaningful for kind topk or sampled, not full")
        if self.kind != "full" and self.k is None:
            raise ValueError(f"kind {self.kind!r} needs k (a positive integer)")
        return self


class CacheParams(Strict):
    codec: Codec = Codec()
    chunk_rows: int = Field(8192, gt=0)
    batch_size: int = Field(1024, gt=0)
    views: int = Field(1, ge=1)  # >1: augmentation-consistent caching of V crop/flip views
    aug_seed: int = 0
    stores: dict[str, StoreParams] = {"full": StoreParams()}
    reference: str = "full"  # the store whose test split measures agreement and KL

    @model_validator(mode="after")
    def _has_reference(self) -> CacheParams:
        if self.reference not in self.stores:
            raise ValueError(
                f"cache.reference={self.reference!r} is not one of cache.stores ({', '.join(self.stores)})"
            )
        return self


class Budget(Strict):
    mode: Literal["epochs", "steps"] = "steps"
    value: int = Field(1500, gt=0)


class StudentParams(Strict):
    arch: str = "cnn1d"
    width: int = Field(64, gt=0)
    budget: Budget = Budget()
    batch_size: int = Field(128, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    train_seeds: list[int] = [0]
    device: str = "auto"
    stacked: Literal["auto", "on", "off"] = "auto"


Unit = Annotated[float, Field(ge=0, le=1)]
Tau = Annotated[float, Field(gt=0)]


class MethodParams(Strict):
    """One student recipe. `loss` defaults to the method's own name in params.yaml."""

    loss: Literal[LOSSES] | None = None  # type: ignore[valid-type]
    lam: Unit = Field(1.0, alias="lambda")
    tau: Tau | list[Tau] = 1.0
    epsilon: Annotated[float, Field(ge=0, lt=1)] = 0.1
    cache: str | None = None  # which store of cache.stores; default: cache.reference
    topk_mode: Literal["renorm", "tail"] = "tail"

    @property
    def uses_teacher(self) -> bool:
        return self.loss not in ("ce", "ls")

    @property
    def taus(self) -> list[float]:
        return list(self.tau) if isinstance(self.tau, list) else [self.tau]


class SweepParams(Strict):
    """Which methods the `student@<α>` stages train at every alpha, and which the `ablation@<α>`
    stages train at `ablation_alphas` only (each stage: all its methods in one process)."""

    methods: list[str]
    ablation_alphas: list[Annotated[float, Field(gt=0, le=1)]] = []
    ablation_methods: list[str] = []


class AnalysisParams(Strict):
    baseline: str = "ce"
    reference: str = "kd"
    controls: list[str] = []
    n_boot: int = Field(2000, gt=0)
    ci: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


class Params(Strict):
    data: DataParams = DataParams()
    alphas: list[float]
    subset_seeds: list[int] = [0]
    teacher: TeacherParams = TeacherParams()
    cache: CacheParams = CacheParams()
    student: StudentParams = StudentParams()
    methods: dict[str, MethodParams]
    sweep: SweepParams
    analysis: AnalysisParams = AnalysisParams()

    def store_of(self, method: str) -> str:
        """The cache store a method reads: its own `cache`, else `cache.reference`."""
        return self.methods[method].cache or self.cache.reference

    @field_validator("alphas")
    @classmethod
    def _alphas_in_unit_interval(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not (0 < a <= 1) or math.isnan(a)]
        if bad:
            raise ValueError(f"every alpha must lie in (0, 1]; got {bad}")
        if not v:
            raise ValueError("alphas must not be empty")
        return sorted(set(v))

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
        for name, m in self.methods.items():
            if m.cache is not None and m.cache not in self.cache.stores:
                raise ValueError(
                    f"methods.{name}.cache={m.cache!r} is not one of cache.stores "
                    f"({', '.join(self.cache.stores)})"
                )
            store = self.cache.stores[self.store_of(name)]
            if store.kind == "sampled" and m.taus != [1.0]:
                raise ValueError(
                    f"methods.{name}.tau={m.tau}: a sampled cache holds draws from the teacher at "
                    "tau=1, so its students must use tau: 1"
                )
            if store.kind != "full" and m.loss not in ("kd", "ce", "ls"):
                raise ValueError(
                    f"methods.{name}: loss {m.loss!r} needs a full cache, not {m.cache!r} ({store.kind})"
                )
        for key in ("methods", "ablation_methods"):
            unknown = [n for n in getattr(self.sweep, key) if n not in self.methods]
            if unknown:
                raise ValueError(f"sweep.{key} names {unknown}, not defined under methods")
        if not self.sweep.methods:
            raise ValueError("sweep.methods is empty: name the methods to train at every alpha")
        if bool(self.sweep.ablation_alphas) != bool(self.sweep.ablation_methods):
            raise ValueError(
                "sweep.ablation_alphas and sweep.ablation_methods must both be set or both be "
                f"empty (got {self.sweep.ablation_alphas} and {self.sweep.ablation_methods})"
            )
        a = self.analysis
        for key, name in (("baseline", a.baseline), ("reference", a.reference)):
            if name not in self.methods:
                raise ValueError(
                    f"analysis.{key}={name!r} is not one of methods ({', '.join(self.methods)})"
                )
        return self


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against params.yaml's documented keys)"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "invalid params:\n" + "\n".join(lines)


def all_alphas(p: Params) -> list[float]:
    return sorted(set(p.alphas) | set(p.sweep.ablation_alphas))


def parse_params(raw: dict[str, Any]) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_errors(err)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found: run from the repository root")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    return parse_params(raw)


def params_hash(*sections: Any) -> str:
    """Short stable hash of the params that define a run (recorded in runs.parquet)."""
    blob = json.dumps(
        [
            s.model_dump(mode="json", by_alias=True) if isinstance(s, BaseModel) else s
            for s in sections
        ],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
