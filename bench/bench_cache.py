"""Cache benchmarks on real teacher logits of the default pipeline (run `dvc repro teacher` first).

Prints, measured side by side in one run:
  1. bytes per row and compression ratio per kind × dtype × codec;
  2. cache read rows/s (sequential whole-chunk reads, random 256-row gathers) as a ratio to the
     rows/s a student consumes while training;
  3. a student step with cached KD targets, and one with an online teacher forward, as ratios to
     a label-only (CE) step — the floor.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import typer

from kdsweep.cache.format import StoreSpec
from kdsweep.cache.reader import LogitCache
from kdsweep.cache.writer import write_cache
from kdsweep.config import Codec, load_params
from kdsweep.data.prepared import load_prepared
from kdsweep.io import load_checkpoint
from kdsweep.losses import student_loss
from kdsweep.models import build_model
from kdsweep.targets import NO_TARGETS, TeacherTargets
from kdsweep.teacher import teacher_model

CODECS = {
    "blosc-zstd-shuffle": Codec(name="blosc", cname="zstd", clevel=5, shuffle="shuffle"),
    "blosc-zstd-bitshuffle": Codec(name="blosc", cname="zstd", clevel=5, shuffle="bitshuffle"),
    "blosc-lz4-shuffle": Codec(name="blosc", cname="lz4", clevel=5, shuffle="shuffle"),
    "zstd-5": Codec(name="zstd", clevel=5),
    "none": Codec(name="none"),
}
KINDS = [
    ("full", "float32", None),
    ("full", "float16", None),
    ("full", "bfloat16", None),
    ("topk", "float16", 2),
    ("topk", "float16", 5),
    ("sampled", "float16", 4),
    ("sampled", "float16", 8),
]


def timed(fn, repeat: int) -> float:
    """Median seconds per call over `repeat` calls, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(
    params: Path = Path("params.yaml"),
    data: Path = Path("data"),
    steps: int = 50,
    quick: bool = False,
) -> None:
    p = load_params(params)
    prep = load_prepared(data / "prepared")
    teacher = teacher_model(p.teachers["main"], prep)
    load_checkpoint(teacher, data / "teachers" / "main.safetensors")
    teacher.eval()
    x = prep.splits.x_train
    with torch.no_grad():
        logits = torch.cat([teacher(x[i : i + 4096]) for i in range(0, len(x), 4096)])
    c = logits.shape[1]
    print(f"teacher logits: {tuple(logits.shape)} from data/teachers/main.safetensors\n")

    tmp = Path(tempfile.mkdtemp(prefix="kdsweep-bench-"))
    print("## 1. size: bytes per row (train split) and compression ratio vs raw float32 logits")
    print(
        f"{'kind':8} {'dtype':9} {'k':>3} {'codec':22} {'bytes/row':>9} {'vs f32 raw':>10} {'codec ratio':>11}"
    )
    kinds = KINDS[:4] if quick else KINDS
    codecs = dict(list(CODECS.items())[:2]) if quick else CODECS
    stores = {}
    for kind, dtype, k in kinds:
        for cname, codec in codecs.items():
            spec = StoreSpec(
                kind=kind, dtype=dtype, k=k, codec=codec, chunk_rows=p.cache.chunk_rows
            )
            path = tmp / f"{kind}-{dtype}-{k}-{cname}.zarr"
            write_cache(path, lambda b: b, {"train": logits}, spec, c, "bench", "bench")
            info = LogitCache(path).info()
            stores[(kind, dtype, k, cname)] = path
            raw = 4 * c
            print(
                f"{kind:8} {dtype:9} {k or '':>3} {cname:22} {info['bytes_per_row']:9.2f} "
                f"{raw / info['bytes_per_row']:9.2f}x {info['compression_ratio']:10.2f}x"
            )

    st = p.student_config(next(iter(p.students)))
    model = build_model(st.arch, tuple(x.shape[1:]), prep.splits.num_classes, st.width)
    opt = torch.optim.AdamW(model.parameters(), lr=st.lr)
    bs = st.batch_size
    y = prep.splits.y_train
    full = LogitCache(stores[("full", "float16", None, "blosc-zstd-shuffle")]).read("train")
    gen = torch.Generator().manual_seed(0)

    def step(kind: str) -> None:
        idx = torch.randint(0, len(x), (bs,), generator=gen)
        z = model(x[idx])
        if kind == "ce":
            loss = student_loss("ce", z, y[idx], NO_TARGETS, 1.0, 4.0, 0.0)[0]
        elif kind == "cached":
            loss = student_loss("kd", z, y[idx], full.rows(idx), 1.0, 4.0, 0.0)[0]
        else:
            with torch.no_grad():
                t = TeacherTargets("full", {"logits": teacher(x[idx])})
            loss = student_loss("kd", z, y[idx], t, 1.0, 4.0, 0.0)[0]
        opt.zero_grad()
        loss.mean().backward()
        opt.step()

    # interleave the three kinds round by round so drift on a noisy machine hits all alike
    per_step: dict[str, list[float]] = {"ce": [], "cached": [], "online": []}
    for _ in range(3 if quick else 7):
        for kind, times in per_step.items():
            times.append(timed(lambda k=kind: [step(k) for _ in range(steps)], 1) / steps)
    t_ce, t_cached, t_online = (sorted(v)[len(v) // 2] for v in per_step.values())
    consume = bs / t_cached
    print("\n## 2. read throughput vs student consumption (student rows/s measured in this run)")
    cache = LogitCache(stores[("full", "float16", None, "blosc-zstd-shuffle")])
    n = cache.num_rows("train")
    t_seq = timed(lambda: cache.read("train"), 3)
    arr = cache.root["train"]["logits"]
    rg = torch.Generator().manual_seed(1)
    t_rand = timed(
        lambda: arr.get_orthogonal_selection(
            (torch.randint(0, n, (256,), generator=rg).sort().values.numpy(), slice(None))
        ),
        20,
    )
    print(f"sequential whole-chunk read: {n / t_seq / consume:10.1f}x the student's consumption")
    print(f"random 256-row gathers:      {256 / t_rand / consume:10.1f}x the student's consumption")
    print("\n## 3. student step cost relative to a label-only (CE) step")
    print(f"cached KD step / CE step:    {t_cached / t_ce:.3f}x")
    print(f"online KD step / CE step:    {t_online / t_ce:.3f}x  (teacher forward every step)")
    print(f"online KD / cached KD:       {t_online / t_cached:.3f}x")


if __name__ == "__main__":
    typer.run(main)
