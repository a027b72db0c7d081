"""Hostile but honest inputs (issue #24, DESIGN.md §10): each family of what a tester tried ends
in a clear refusal — a KdsweepError naming the file or key and the fix, never a traceback — or
a correct recovery. The kill-and-resume family is tests/test_interrupt.py (a real SIGKILL).

Families: caches bound to their rows; names that reach paths, stage names and commands; values
refused at load; atomic outputs; corrupt artifacts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import zarr
from typer.testing import CliRunner

from bench.common import git_commit, temp_repo
from kdsweep.cache.format import CacheError, StoreSpec
from kdsweep.cache.reader import LogitCache
from kdsweep.cache.writer import write_cache
from kdsweep.cli import app
from kdsweep.config import ParamsError, load_params, parse_params
from kdsweep.errors import KdsweepError
from kdsweep.runs import collect_runs, read_runs
from tests.conftest import tiny_raw
from tests.test_cache import C, build, inputs, teacher

REPO = Path(__file__).resolve().parents[1]


# --- caches bound to their rows --------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A complete float32 store: train 300 rows in 5 chunks of 64, test 70 rows in 2."""
    build(tmp_path / "c.zarr", StoreSpec(dtype="float32", chunk_rows=64))
    return tmp_path / "c.zarr"


def chunk(store: Path, split: str, name: str, i: int) -> Path:
    return store / split / name / "c" / str(i) / "0"


def test_swapped_chunks_pass_their_crc_but_are_refused(store):
    a, b = chunk(store, "train", "logits", 0), chunk(store, "train", "logits", 1)
    first, second = a.read_bytes(), b.read_bytes()
    assert first != second
    a.write_bytes(second)
    b.write_bytes(first)
    cache = LogitCache(store)  # cheap on open: the bytes are checked where they are read
    assert cache.read("test").tensors  # the untouched split still reads
    with pytest.raises(CacheError, match=r"train/logits: chunk 0 .*manifest.*dvc repro -f"):
        cache.read("train")
    with pytest.raises(CacheError, match="chunk 0"):
        cache.verify()
    result = CliRunner().invoke(app, ["cache", "verify", str(store)])
    assert result.exit_code == 1 and "manifest" in result.output


def test_a_duplicated_chunk_is_refused(store):
    chunk(store, "train", "logits", 3).write_bytes(chunk(store, "train", "logits", 2).read_bytes())
    with pytest.raises(CacheError, match="chunk 3"):
        LogitCache(store).read("train", slice(128, 256))


def test_an_array_from_another_store_is_refused(store, tmp_path):
    other = tmp_path / "other.zarr"  # same shapes and fingerprints, another teacher's rows
    spec = StoreSpec(dtype="float32", chunk_rows=64)
    write_cache(other, lambda x: -teacher(x), inputs(), spec, C, "teacher-fp", "data-fp")
    copied = store / "train" / "logits"
    shutil.rmtree(copied)
    shutil.copytree(other / "train" / "logits", copied)  # same shapes, same fingerprints
    with pytest.raises(CacheError, match="not the chunk the store was written with"):
        LogitCache(store, "teacher-fp", "data-fp").read("train")
    # linked in instead of copied: refused on open, before any byte is read
    shutil.rmtree(copied)
    copied.symlink_to(other / "train" / "logits")
    with pytest.raises(CacheError, match="symlink"):
        LogitCache(store)


def _edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def test_a_pickle_codec_is_named_and_never_decoded(store):
    def pickle(meta: dict) -> None:
        meta["codecs"].insert(1, {"name": "numcodecs.pickle", "configuration": {}})

    _edit_json(store / "train" / "logits" / "zarr.json", pickle)
    with pytest.raises(CacheError, match=r"codec\(s\) \['numcodecs.pickle'\].*never decoded"):
        LogitCache(store)


def test_a_zarr_v2_store_is_named_as_such(tmp_path):
    g = zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2)
    g.create_array("logits", shape=(4, 2), dtype="f4")
    with pytest.raises(CacheError, match="Zarr v2 store"):
        LogitCache(tmp_path / "v2.zarr")


@pytest.mark.parametrize(
    ("key", "value"),
    [("splits", ["train", "test"]), ("row_shape", {}), ("kind", ["full"]), ("manifest", [])],
)
def test_malformed_root_attributes_are_refused_with_a_message(store, key, value):
    _edit_json(store / "zarr.json", lambda meta: meta["attributes"].__setitem__(key, value))
    with pytest.raises(CacheError, match=f"root attribute {key}"):
        LogitCache(store)


def test_a_store_claiming_a_trillion_rows_is_refused_without_enumerating_them(store):
    n = 10**12
    _edit_json(store / "zarr.json", lambda m: m["attributes"]["splits"].__setitem__("train", n))
    _edit_json(store / "train" / "logits" / "zarr.json", lambda m: m.__setitem__("shape", [n, 10]))
    with pytest.raises(CacheError, match="manifest does not list its 15625000000 chunks"):
        LogitCache(store)
    result = CliRunner().invoke(app, ["cache", "info", str(store)])
    assert result.exit_code == 1 and "manifest" in result.output


# --- names that reach a path, a stage name or a command ---------------------------------------


@pytest.mark.parametrize("name", ["x; touch INJECTED", "../x", "a/b", "Full", "1st", "$(id)"])
@pytest.mark.parametrize("where", ["store", "method"])
def test_names_must_be_identifiers(name, where):
    raw = tiny_raw()
    if where == "store":
        raw["cache"]["stores"][name] = {"teacher": "main"}
    else:
        raw["methods"][name] = {"loss": "ce"}
    with pytest.raises(ParamsError, match="not an identifier"):
        parse_params(raw)


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(
        ["dvc", *args], cwd=repo, capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture
def dvc_repo() -> Path:
    """A git + DVC copy of the pipeline with tiny params, committed; nothing run yet."""
    repo = temp_repo(yaml.safe_dump(tiny_raw()))
    git_commit(repo, "init")
    return repo


def ran(res: subprocess.CompletedProcess) -> list[str]:
    out = res.stdout + res.stderr
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_store_name_with_shell_syntax_is_refused_before_any_stage_runs(dvc_repo):
    raw = tiny_raw()
    raw["cache"]["stores"]["x; touch INJECTED"] = {"teacher": "main"}
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(raw))
    res = _dvc(dvc_repo, "repro")
    assert res.returncode != 0
    assert ran(res) == ["check"]  # the stage every other one depends on, and nothing after it
    assert "not an identifier" in res.stderr + res.stdout
    assert not (dvc_repo / "INJECTED").exists() and not (dvc_repo / "data/prepared").exists()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_misspelt_section_fails_dvc_repro_instead_of_being_up_to_date(dvc_repo):
    assert _dvc(dvc_repo, "repro", "check").returncode == 0
    raw = tiny_raw()
    raw["studnet"] = {"width": 8}  # no stage reads it: only `check` depends on the whole file
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(raw))
    res = _dvc(dvc_repo, "repro")
    assert res.returncode != 0 and ran(res) == ["check"]
    assert "studnet: unknown key" in res.stderr + res.stdout


# --- values refused at load, before any work ---------------------------------------------------


def _set(raw: dict, dotted: str, value) -> dict:
    *path, last = dotted.split(".")
    node = raw
    for k in path:
        node = node[k]
    node[last] = value
    return raw


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("methods.kd.tau", float("inf"), "finite"),
        ("methods.kd.tau", [4, float("inf")], "finite"),
        ("methods.kd_sampled4.tau", float("nan"), "finite"),
        ("cache.stores.sampled4.tau", float("inf"), "finite"),
        ("student.lr", float("inf"), "finite"),
        ("teachers.main.lr", float("nan"), "finite"),
        ("analysis.equivalence_margin", float("inf"), "finite"),
        ("teachers.main.device", "gpu9", "'auto', 'cpu' or 'cuda'"),
        ("student.device", "cuda:0; rm -rf /", "'auto', 'cpu' or 'cuda'"),
        ("student.width", 10**7, "student.width=10000000 needs at least"),
        ("teachers.main.width", 10**7, "teachers.main.width=10000000 needs at least"),
        ("students.small.width", 10**7, "students.small.width=10000000 needs at least"),
        ("data.n_train", 10**11, "data.n_train=100000000000 needs at least"),
        ("cache.chunk_rows", 10**10, "cache.chunk_rows=10000000000 exceeds"),
    ],
)
def test_bad_values_are_refused_at_load(key, value, message):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")) as err:
        parse_params(_set(tiny_raw(), key, value))
    assert message in str(err.value)


def test_duplicate_keys_are_refused(tmp_path):
    text = yaml.safe_dump(tiny_raw()) + "alphas: [0.5]\n"  # a second `alphas`: the last would win
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ParamsError, match="duplicate or unhashable key 'alphas'"):
        load_params(tmp_path / "p.yaml")


def test_a_yaml_alias_bomb_is_refused_in_a_short_message(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (tmp_path / "p.yaml").write_text("\n".join(lines) + "\n")
    assert (tmp_path / "p.yaml").stat().st_size < 600
    with pytest.raises(ParamsError, match="aliases are not allowed") as err:
        load_params(tmp_path / "p.yaml")
    assert len(str(err.value)) < 1000


def test_error_messages_show_a_huge_value_briefly():
    with pytest.raises(ParamsError) as err:
        parse_params(_set(tiny_raw(), "alphas", [[0.5] * 10**5] * 10))
    assert len(str(err.value)) < 2000


# --- every output atomic -----------------------------------------------------------------------


def test_a_figure_save_that_fails_midway_leaves_the_old_figure(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from kdsweep.report import figures

    path = tmp_path / "score_vs_alpha.png"
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    figures.save(fig, path)
    old = path.read_bytes()
    assert old.startswith(b"\x89PNG")

    def full_disk(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")  # as far as the disk had room
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError, match="No space"):
        figures.save(fig, path)
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


# --- corrupt artifacts: a message naming the file and the fix ---------------------------------


def test_a_truncated_runs_json_names_its_stage(tmp_path):
    out = tmp_path / "students" / "full"
    out.mkdir(parents=True)
    (out / "runs.json").write_text('[{"run_id": "a", "datas')
    with pytest.raises(
        KdsweepError, match=r"full/runs.json is not valid JSON.*dvc repro -f student@full"
    ):
        collect_runs(tmp_path / "students", ["full"])


def test_a_truncated_runs_parquet_is_refused_by_report_and_results(tmp_path):
    path = tmp_path / "runs.parquet"
    path.write_bytes(b"PAR1\x00\x00truncated")
    with pytest.raises(KdsweepError, match="not a readable Parquet file.*dvc repro -f aggregate"):
        read_runs(path)
    result = CliRunner().invoke(app, ["results", "--path", str(path)])
    assert result.exit_code == 1 and "dvc repro -f aggregate" in result.output


def test_a_decompression_bomb_image_is_refused(tmp_path, monkeypatch):
    from PIL import Image

    from kdsweep.data import images
    from kdsweep.data.splits import DataError

    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 pixels: over twice the limit
    with pytest.raises(DataError, match=r"bomb.png cannot be read safely \(DecompressionBomb"):
        images._load_image(str(tmp_path / "bomb.png"))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="text.png cannot be read safely"):
        images._load_image(str(tmp_path / "text.png"))


def test_a_binary_file_as_a_corpus_is_refused(tmp_path):
    from kdsweep.data import text

    (tmp_path / "corpus.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(text.CorpusError, match="corpus.txt is not UTF-8 text"):
        text._textfile_documents(str(tmp_path / "corpus.txt"))
