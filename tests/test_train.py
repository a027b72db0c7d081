"""kdsweep.train: AdamW is torch's AdamW + cosine schedule without the torch._dynamo import; `fit`
is reproducible per seed and takes its batches from `batch`; kdsweep.metrics evaluates."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdsweep.metrics import evaluate, expected_calibration_error
from kdsweep.train import AdamW, BestVal, NonFiniteLoss, accuracy, fit, num_steps


def _twins() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    a.add_module("unused", nn.Linear(2, 2).double())  # never gets a gradient
    b = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    b.add_module("unused", nn.Linear(2, 2).double())
    b.load_state_dict(a.state_dict())
    return a, b


def test_adamw_matches_torch_optim_adamw_with_cosine_schedule():
    ours, ref = _twins()
    steps = 25
    opt = AdamW(ours.parameters(), lr=0.05, weight_decay=0.1, steps=steps)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, steps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            model[:3](x).pow(2).mean().backward()
            o.step()
        sched.step()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
    assert not torch.equal(ours[0].weight, _twins()[0][0].weight)  # it did train
    assert torch.equal(ours.unused.weight, _twins()[0].unused.weight)  # no grad, untouched


def test_training_a_student_does_not_import_dynamo():
    """The reason AdamW exists: a stage process must not pay for importing torch._dynamo."""
    code = (
        "import sys, torch\n"
        "from kdsweep.models import build_model\n"
        "from kdsweep.train import fit\n"
        "m = build_model('cnn1d', (1, 40), 10, 8)\n"
        "x, y = torch.randn(64, 1, 40), torch.randint(0, 10, (64,))\n"
        "fit(m, x, lambda z, i: torch.nn.functional.cross_entropy(z, y[i], reduction='none'),"
        " 3, 16, 0.01, 0.0, 0)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _student(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 1, 12, generator=g, dtype=torch.float64), torch.randint(
        0, 4, (n,), generator=g
    )


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _ce(y: torch.Tensor):
    return lambda z, idx: F.cross_entropy(z, y[idx], reduction="none")


def test_fit_is_reproducible_per_seed_and_seeds_differ():
    """The same seed gives the same student; two different seeds (same initialisation, same
    data) give different data orders, hence different students."""
    x, y = _data()

    def run(seed: int) -> torch.Tensor:
        model = _student(0)
        fit(model, x, _ce(y), 6, 16, 0.05, 0.0, seed)
        assert not model.training
        return _flat(model)

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_fit_batch_builds_inputs_and_loss_context():
    """`batch(idx)` supplies the step's inputs and whatever the loss reads; by default the
    inputs are x[idx] and the context is idx itself."""
    x, y = _data()
    seen: list[torch.Tensor] = []

    def batch(idx: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        seen.append(idx)
        return x[idx], (y[idx], idx)

    def loss_fn(z: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        labels, idx = ctx
        assert torch.equal(labels, y[idx])
        return F.cross_entropy(z, labels, reduction="none")

    a, b = _student(0), _student(0)
    fit(a, x, loss_fn, 7, 16, 0.05, 0.1, 3, batch=batch)
    fit(b, x, _ce(y), 7, 16, 0.05, 0.1, 3)
    assert torch.equal(_flat(a), _flat(b))  # the same steps on the same rows
    assert len(seen) == 7 and all(len(i) == 16 for i in seen)
    # epoch-wise permutations: 2 full batches per epoch (the last 8 rows dropped), no repeats
    for epoch in range(3):
        rows = torch.cat(seen[2 * epoch : 2 * epoch + 2])
        assert len(rows.unique()) == 32


def test_fit_raises_on_a_non_finite_loss():
    x, y = _data()
    with pytest.raises(NonFiniteLoss, match="at step 0"):
        fit(_student(0), x, lambda z, i: z.sum(-1) * float("nan"), 3, 16, 0.05, 0.0, 0, desc="s")


def _val_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def _task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task (the label is the largest of the first 4 inputs), so that validation
    rows drawn apart from the training rows measure generalisation."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 12, generator=g, dtype=torch.float64)
    return x, x[:, 0, :4].argmax(1)


def _last_and_best(lr: float, weight_decay: float):
    """One student trained 40 steps under `last` and its twin under best_val (every 4 steps)."""
    (x, y), (xv, yv) = _task(64, 0), _task(32, 1)
    last, best = _student(0), _student(0)
    fit(last, x, _ce(y), 40, 16, lr, weight_decay, seed=1)
    select = BestVal(xv[None], yv[None], every=4)
    fit(best, x, _ce(y), 40, 16, lr, weight_decay, seed=1, select=select)
    return last, best, select, (xv, yv)


def test_best_val_keeps_the_checkpoint_before_a_student_diverges():
    """A learning rate far too high: the validation loss is lowest at the first evaluation and
    then climbs; best_val ends the student there, last at whatever the final step left."""
    last, best, select, (xv, yv) = _last_and_best(0.3, 0.0)
    assert int(select.step[0]) == 4
    assert _val_loss(best, xv, yv) == pytest.approx(float(select.loss[0]), rel=1e-12)
    assert _val_loss(best, xv, yv) < 0.5 * _val_loss(last, xv, yv)
    assert not best.training


def test_best_val_evaluation_leaves_training_unchanged():
    """Evaluating draws no random numbers and touches no state: while the validation loss only
    falls, best_val's student is exactly last's."""
    last, best, select, _ = _last_and_best(0.05, 0.1)
    assert int(select.step[0]) == 40
    assert torch.equal(_flat(best), _flat(last))


def test_the_validation_curve_is_recorded_without_selection():
    """Under `select: last` (keep_best off) the curve is the one best_val sees, every 4 steps
    and the last, and the student ends at its last step, exactly as without validation."""
    last, _, select, (xv, yv) = _last_and_best(0.3, 0.0)
    (x, y) = _task(64, 0)
    plain = _student(0)
    watch = BestVal(xv[None], yv[None], every=4, keep_best=False)
    fit(plain, x, _ce(y), 40, 16, 0.3, 0.0, seed=1, select=watch)
    assert torch.equal(_flat(plain), _flat(last))
    steps, losses = watch.curve_of(0)
    assert steps == list(range(4, 41, 4)) and select.curve_of(0) == (steps, losses)
    assert losses[-1] == pytest.approx(_val_loss(plain, xv, yv), rel=1e-12)
    assert min(losses) < 0.5 * losses[-1] and int(watch.step[0]) == 0


def test_best_val_ends_a_student_whose_loss_turns_non_finite_at_its_checkpoint():
    x, y = _data()
    calls = 0

    def loss_fn(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return F.cross_entropy(z, y[idx], reduction="none") * (float("nan") if calls > 5 else 1)

    model = _student(0)
    select = BestVal(x[None], y[None], every=2)
    fit(model, x, loss_fn, 10, 16, 0.05, 0.0, seed=0, select=select)
    assert int(select.step[0]) == 4 and torch.isfinite(_flat(model)).all()
    with pytest.raises(NonFiniteLoss, match="at step 0"):  # no checkpoint yet: it still fails
        fit(
            _student(0),
            x,
            lambda z, i: z.sum(-1) * float("nan"),
            3,
            16,
            0.05,
            0.0,
            0,
            select=BestVal(x[None], y[None], every=2),
        )


@pytest.mark.parametrize(
    ("mode", "value", "n", "bs", "min_epochs", "steps"),
    [
        ("steps", 50, 10, 32, 0, 50),
        ("epochs", 3, 100, 32, 0, 12),
        ("epochs", 2, 10, 32, 0, 2),
        ("steps", 50, 10, 32, 60, 60),  # 60 passes over one batch outrun 50 steps
        ("steps", 50, 1000, 32, 2, 64),  # at large n the epoch floor decides
        ("steps", 50, 100, 32, 2, 50),
        ("epochs", 3, 100, 32, 5, 20),
    ],
)
def test_num_steps(mode, value, n, bs, min_epochs, steps):
    assert num_steps(mode, value, n, bs, min_epochs) == steps


def test_accuracy_counts_positions():
    z = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    assert accuracy(z, torch.tensor([[0, 1], [1, 0]])) == 0.75


def test_evaluate_against_the_teacher():
    g = torch.Generator().manual_seed(4)
    logits, y = torch.randn(64, 5, generator=g), torch.randint(0, 5, (64,), generator=g)
    out = evaluate(logits, y, teacher_top1=logits.argmax(-1), teacher_logits=logits)
    assert out["agreement"] == 1.0 and abs(out["test_kl"]) < 1e-6
    assert out["test_error"] == pytest.approx(1 - out["test_acc"])
    assert out["test_ppl"] == pytest.approx(math.exp(F.cross_entropy(logits, y).item()), rel=1e-6)
    labels_only = evaluate(logits, y)
    assert labels_only["agreement"] is None and labels_only["test_kl"] is None
    other = evaluate(logits, y, teacher_top1=(logits.argmax(-1) + 1) % 5, teacher_logits=-logits)
    assert other["agreement"] == 0.0 and other["test_kl"] > 0.1


def test_expected_calibration_error():
    y = torch.zeros(100, dtype=torch.long)
    confident_right = torch.tensor([[20.0, 0.0]]).expand(100, -1)
    assert expected_calibration_error(confident_right, y) < 1e-6
    # always 80% sure of class 0, right half of the time: |0.8 - 0.5| = 0.3
    z = torch.tensor([[math.log(4.0), 0.0]]).expand(100, -1)
    half = torch.arange(100) % 2
    assert expected_calibration_error(z, half) == pytest.approx(0.3, abs=1e-6)


def test_fit_leaves_denormal_floats_as_it_found_them() -> None:
    """fit flushes denormals while it trains (speed) but restores IEEE behaviour afterwards."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    fit(model, x, lambda z, i: F.cross_entropy(z, y[i], reduction="none"), 3, 8, 0.01, 0.0, 0)
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert float(tiny * 1.0) != 0.0
