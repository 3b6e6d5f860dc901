"""torch.compile traces our layers in one graph (fake kernels registered for every op)."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.functional import kernels
from tests.tolerances import TORCH_AGREEMENT

pytestmark = [
    pytest.mark.slow,
    # inductor imports torch.jit internals that warn about their own deprecation
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
    pytest.mark.skipif(not kernels.available(), reason="fused kernels unavailable"),
]


def test_compiled_training_matches_torch():
    torch._dynamo.reset()
    ours = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        batchnorm.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16, bias=False),
        batchnorm.BatchNorm1d(16),
    )
    ref = batchnorm.convert(ours, to="torch")
    compiled = torch.compile(ours, fullgraph=True)
    for _ in range(3):
        x = torch.randn(16, 3, 8, 8) * 2 + 1
        y, y_ref = compiled(x), ref(x)
        torch.testing.assert_close(y, y_ref, **TORCH_AGREEMENT)
        y.square().sum().backward()
        y_ref.square().sum().backward()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
    ref_state = ref.state_dict()
    for name, a in ours.state_dict().items():
        torch.testing.assert_close(a, ref_state[name], **TORCH_AGREEMENT, msg=name)
    ours.eval()
    ref.eval()
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(compiled(x), ref(x), **TORCH_AGREEMENT)


def test_fullgraph_compile_before_any_eager_call_in_a_fresh_process():
    """Compiling first (the kernels not loaded yet) traces the portable path in one graph."""
    code = """
import torch, batchnorm
from batchnorm.functional import kernels
torch.manual_seed(0)
ours = batchnorm.BatchNorm2d(8)
ref = batchnorm.convert(ours, to="torch")
compiled = torch.compile(ours, fullgraph=True)
x = torch.randn(4, 8, 5, 5) * 3 + 2
g = torch.randn(4, 8, 5, 5)
y, y_ref = compiled(x), ref(x)
assert not kernels.loaded()
torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
(y * g).sum().backward()
(y_ref * g).sum().backward()
for a, b in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)
torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
assert int(ours.num_batches_tracked) == 1
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize(
    "layout",
    ["transposed-3d", "permuted-4d", "channels_last", "contiguous"],
)
def test_every_op_passes_opcheck(layout):
    """torch.library.opcheck: schema, fake kernel (shapes and strides, which torch.compile
    trusts), autograd registration, for every op. The kernels read an input that is neither
    contiguous nor channels_last through a contiguous copy, and their outputs are contiguous."""
    x = {
        "transposed-3d": lambda: torch.randn(4, 5, 3).transpose(1, 2),
        "permuted-4d": lambda: torch.randn(2, 4, 3, 5).permute(0, 2, 1, 3),
        "channels_last": lambda: torch.randn(2, 3, 4, 5).contiguous(
            memory_format=torch.channels_last
        ),
        "contiguous": lambda: torch.randn(6, 3, 4),
    }[layout]()
    c, ops = x.shape[1], torch.ops.batchnorm
    mean = torch.randn(c, dtype=torch.float64)
    var = torch.rand(c, dtype=torch.float64) + 0.5
    w = torch.randn(c, requires_grad=True)
    g = torch.randn_like(x)
    count = x.numel() // c
    buffers = (torch.zeros(c), torch.ones(c), torch.zeros((), dtype=torch.long), None)
    cases = [
        (ops.train_forward.default, (x.requires_grad_(), w, None, *buffers, 0.1, 1e-5, True)),
        (ops.train_backward.default, (g, x.detach(), mean, var, w.detach(), 1e-5, [True] * 3)),
        (ops.normalize.default, (x.detach(), mean, var, None, None, 1e-5)),
        (ops.moments.default, (x.detach(),)),
        (ops.backward_reduce.default, (g, x.detach(), mean)),
        (
            ops.backward_elementwise.default,
            (g, x.detach(), mean, var, None, mean, mean, count, 1e-5),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
