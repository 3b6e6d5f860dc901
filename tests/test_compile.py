"""torch.compile traces our layers in one graph (fake kernels registered for every op)."""

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
