import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from kdsweep import models, pipeline
from kdsweep.config import ParamsError, parse_params
from kdsweep.data import DataError, load_prepared
from tests.conftest import tiny_raw

ALL_METHODS = list(tiny_raw()["methods"])


def test_students_of_every_method_train_from_the_cache_without_the_teacher(
    workspace, tiny_params, monkeypatch
):
    """Any teacher construction, checkpoint load or teacher-width forward raises: students never need one."""

    def forbidden(*a, **k):
        raise AssertionError("the student stage touched the teacher")

    monkeypatch.setattr(pipeline, "load_teacher", forbidden)
    monkeypatch.setattr(pipeline, "_teacher_model", forbidden)
    monkeypatch.setattr(pipeline, "load_checkpoint", forbidden)
    real_forward = models.CNN1D.forward

    def guarded_forward(self, x):
        if self.features[0].out_channels == tiny_params.teacher.width:
            forbidden()
        return real_forward(self, x)

    monkeypatch.setattr(models.CNN1D, "forward", guarded_forward)
    out = pipeline.run_student_stage(tiny_params, 0.05, ALL_METHODS, workspace / "data/students/s")
    rows = json.loads(out.read_text())
    for method in ALL_METHODS:  # one stage process, one row per student of every method
        mine = [r for r in rows if r["method"] == method]
        n_tau = len(tiny_params.methods[method].taus)
        assert len(mine) == 2 * n_tau, method  # two subset seeds × τ variants
        assert {r["subset_seed"] for r in mine} == {0, 1}
    assert len({r["run_id"] for r in rows}) == len(rows)
    for r in rows:
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0
        assert r["n_train"] == 30 and r["test_kl"] >= 0 and r["ece"] >= 0


def test_seeds_are_deterministic_on_cpu(workspace, tiny_params):
    a = pipeline.train_students(tiny_params, 0.05, ["kd"])
    b = pipeline.train_students(tiny_params, 0.05, ["kd"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    assert a[0]["test_acc"] != a[1]["test_acc"] or a[0]["subset_seed"] != a[1]["subset_seed"]


def test_student_refuses_a_cache_from_another_teacher(workspace, tiny_params):
    import shutil

    shutil.copy(
        workspace / "data/teachers/random_head.safetensors",
        workspace / "data/teachers/main.safetensors",
    )
    with pytest.raises(ValueError, match="another teacher"):
        pipeline.run_student_stage(tiny_params, 0.05, ["kd"], workspace / "out")


def test_subset_too_small_for_the_classes_is_refused(workspace):
    raw = tiny_raw()
    raw["alphas"] = [0.01, 1.0]  # 6 of 600 samples < 10 classes
    with pytest.raises(DataError, match="fewer than the 10 classes"):
        pipeline.run_student_stage(parse_params(raw), 0.01, ["ce"], workspace / "out")


def test_pickled_checkpoint_is_refused_without_running_it(workspace, tiny_params, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (workspace / "data/teachers/main.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="not a valid safetensors checkpoint"):
        pipeline.load_teacher(tiny_params, "main", load_prepared(Path("data/prepared")))
    assert not marker.exists()


def test_checkpoint_with_wrong_shapes_is_refused(workspace):
    raw = tiny_raw()
    raw["teacher"]["width"] = 32
    with pytest.raises(ValueError, match="does not fit the configured model"):
        pipeline.load_teacher(parse_params(raw), "main", load_prepared(Path("data/prepared")))


def test_nan_loss_stops_with_a_clear_error(workspace, tiny_params):
    from kdsweep.train import NonFiniteLoss, fit

    m = models.build_model("mlp", (1, 40), 10, 8)
    x = torch.randn(50, 1, 40)
    with pytest.raises(NonFiniteLoss, match="loss became nan"):
        fit(m, x, lambda z, i: z.sum(-1) * float("nan"), 3, 16, 0.01, 0.0, 0)


@pytest.mark.parametrize(
    "path,value,message",
    [
        (("alphas",), [0.0, 0.5], "alphas: every alpha must lie in (0, 1]"),
        (("alphas",), [1.5], "alphas: every alpha must lie in (0, 1]"),
        (("methods", "kd", "tau"), -1.0, "methods.kd.tau"),
        (("methods", "kd", "lambda"), 1.5, "methods.kd.lambda"),
        (("methods", "kd", "lambda"), "high", "methods.kd.lambda"),
        (("methods", "distill"), {}, "methods.distill: unknown method"),
        (("methods", "kd", "cache"), "nope", "methods.kd.cache='nope' is not one of cache.stores"),
        (("student", "budget", "mode"), "minutes", "student.budget.mode"),
        (("student", "widht"), 3, "student.widht: unknown key"),
        (("cache", "stores", "top3", "k"), None, "needs k"),
        (("teacher", "epochs"), 0, "teacher.epochs"),
        (("sweep", "methods"), ["ce", "kdd"], "sweep.methods names ['kdd']"),
        (("sweep", "methods"), [], "sweep.methods is empty"),
        (("sweep", "ablation_methods"), [], "must both be set or both be empty"),
        (("data", "name"), "imagenet21k", "data.name"),
    ],
)
def test_invalid_params_name_the_key_and_the_allowed_values(path, value, message):
    raw = tiny_raw()
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert message in str(err.value), str(err.value)


def test_stacked_stage_matches_the_sequential_one(workspace):
    """student.stacked: on trains the students of every method at once, in one stack per loss
    and target shape; the rows match `off` (one student after another)."""
    rows = {}
    for mode in ("on", "off"):
        raw = tiny_raw()
        raw["student"].update(arch="mlp", width=16, stacked=mode)
        rows[mode] = pipeline.train_students(parse_params(raw), 0.05, ALL_METHODS)
    assert [r["train_path"] for r in rows["on"]] == ["stacked"] * len(rows["on"])
    assert [r["train_path"] for r in rows["off"]] == ["sequential"] * len(rows["off"])
    assert (
        len(rows["on"]) == len(rows["off"]) == 24
    )  # (11 methods + kd's second τ) × 2 subset seeds
    for a, b in zip(rows["on"], rows["off"], strict=True):
        assert (a["method"], a["subset_seed"], a["tau"]) == (
            b["method"],
            b["subset_seed"],
            b["tau"],
        )
        assert a["test_acc"] == pytest.approx(b["test_acc"], abs=0.01), a["method"]
        assert a["agreement"] == pytest.approx(b["agreement"], abs=0.01), a["method"]


def test_students_share_a_stack_when_only_lambda_tau_seed_and_data_differ(workspace, tiny_params):
    p = tiny_params
    prep = load_prepared(Path("data/prepared"))
    train = {s: pipeline.open_store(p, s, prep).read("train") for s in p.cache.stores}
    none = pipeline.CacheSplit("none", {})

    def keys(method: str) -> set:
        out = set()
        for job in pipeline.student_jobs(p, 0.05, method):
            t = train[p.store_of(method)] if job.m.uses_teacher else none
            out.add(pipeline.stack_key(job, pipeline.subset_targets(job, prep, t)[2]))
        return out

    kd = keys("kd")
    assert len(kd) == 1  # both τ and both subset seeds
    for same in ("ls_matched", "shuffled_dk", "ls_teacher", "random_head"):
        assert keys(same) == kd, same  # plain KD on transformed (or another teacher's) logits
    distinct = [kd, keys("ce"), keys("ls"), keys("top1_teacher"), keys("logit_mse")]
    distinct += [keys("kd_top3"), keys("kd_sampled4")]
    assert len(set().union(*distinct)) == len(distinct)
    raw = tiny_raw()
    raw["cache"]["stores"]["top2"] = {"kind": "topk", "k": 2}
    raw["methods"]["kd_top2"] = {"loss": "kd", "tau": 4, "cache": "top2"}
    raw["methods"]["kd_top3_renorm"] = {
        "loss": "kd",
        "tau": 4,
        "cache": "top3",
        "topk_mode": "renorm",
    }
    p = parse_params(raw)
    pipeline.build_cache(p, "top2")
    train["top2"] = pipeline.open_store(p, "top2", prep).read("train")
    assert keys("kd_top2").isdisjoint(keys("kd_top3"))  # other k: other target shapes
    assert keys("kd_top3_renorm").isdisjoint(keys("kd_top3"))  # another loss


def _leaves(node: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out += _leaves(value, (*prefix, key))
        else:
            out.append((*prefix, key))
    return out


DEFAULT = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())


@pytest.mark.parametrize("path", _leaves(DEFAULT), ids=lambda p: ".".join(map(str, p)))
def test_every_params_key_refuses_a_wrong_type_by_name(path):
    """Each leaf of the default params.yaml, given a value of the wrong type, is named."""
    raw = copy.deepcopy(DEFAULT)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = {"not": "a valid value"}
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert ".".join(map(str, path)) in str(err.value), str(err.value)


@pytest.mark.parametrize("section", [k for k, v in DEFAULT.items() if isinstance(v, dict)])
def test_unknown_keys_are_refused_in_every_section(section):
    """A misspelt key is named (in `methods`, a new name that is not a recipe is refused)."""
    raw = copy.deepcopy(DEFAULT)
    raw[section]["typo_key"] = 1
    raw["typo_section"] = 1
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert f"{section}.typo_key:" in str(err.value) and "typo_section: unknown key" in str(
        err.value
    )
