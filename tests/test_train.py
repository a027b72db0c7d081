"""kdsweep.train.AdamW is torch's AdamW + cosine schedule, without the torch._dynamo import."""

import subprocess
import sys

import torch
from torch import nn

from kdsweep.train import AdamW


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
