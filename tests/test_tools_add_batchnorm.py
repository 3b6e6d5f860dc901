"""add_batchnorm (Alg. 2 lines 1–2, Sec. 3.2), and Algorithm 2 end to end with the other tools."""

import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
from batchnorm.tools import NONLINEARITIES, ModelTraceError, add_batchnorm, fold, recalibrate
from batchnorm.tools._graph import trace
from tests.tolerances import FOLD_F32_REL


def mnist_mlp() -> nn.Sequential:
    """The network of the paper's Sec. 4.1: 3 hidden layers of 100 sigmoid units."""
    return nn.Sequential(
        nn.Linear(784, 100),
        nn.Sigmoid(),
        nn.Linear(100, 100),
        nn.Sigmoid(),
        nn.Linear(100, 100),
        nn.Sigmoid(),
        nn.Linear(100, 10),
    )


def test_paper_mlp_gets_bn_before_each_sigmoid():
    model = mnist_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = add_batchnorm(model)
    kinds = [type(m).__name__ for m in new]
    assert kinds == ["Linear", "BatchNorm1d", "Sigmoid"] * 3 + ["Linear"]
    assert all(isinstance(new[i], batchnorm.BatchNorm1d) for i in (1, 4, 7))
    assert new[1].layer_name == "1"
    assert [new[i].bias is None for i in (0, 3, 6, 9)] == [True, True, True, False]
    torch.testing.assert_close(new[0].weight, model[0].weight, rtol=0, atol=0)
    # the input is untouched
    assert len(model) == 7 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[0].bias is not None
    with pytest.warns(UserWarning, match="nothing was inserted"):  # idempotent: BN is in place
        assert len(add_batchnorm(new)) == len(new)
    # in training mode every sigmoid input is normalized per unit (γ=1, β=0): mean 0 and
    # variance σ²/(σ² + ε), σ² the unit's batch variance before BN
    seen = []
    for i in (1, 2, 4, 5, 7, 8):
        new[i].register_forward_pre_hook(lambda _m, args: seen.append(args[0].double()))
    new(torch.rand(60, 784))
    for before_bn, z in zip(seen[::2], seen[1::2], strict=True):
        var = before_bn.var(0, correction=0)
        torch.testing.assert_close(z.mean(0), torch.zeros(100).double(), rtol=0, atol=1e-6)
        torch.testing.assert_close(z.var(0, correction=0), var / (var + 1e-5), rtol=1e-5, atol=0)


def test_bias_is_dropped_because_bn_cancels_it():
    """Sec. 3.2: with BN after it, the layer's bias has no effect at all on the output."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU()).double()
    new = add_batchnorm(model)
    x = torch.randn(16, 5, dtype=torch.float64)
    with_bias = nn.Sequential(model[0], new[1], new[2])  # the original layer, bias included
    torch.testing.assert_close(with_bias(x), new(x), rtol=1e-12, atol=1e-12)


def test_skip_last_and_named_sequentials():
    model = nn.Sequential(
        OrderedDict(fc1=nn.Linear(3, 4), act1=nn.ReLU(), fc2=nn.Linear(4, 1), out=nn.Sigmoid())
    )
    assert list(add_batchnorm(model)._modules) == ["fc1", "fc1_bn", "act1", "fc2", "fc2_bn", "out"]
    new = add_batchnorm(model, skip_last=True, eps=1e-3, momentum=None)
    assert list(new._modules) == ["fc1", "fc1_bn", "act1", "fc2", "out"]
    assert new.fc1_bn.eps == 1e-3 and new.fc1_bn.stats_mode == "cumulative"
    assert new.fc2.bias is not None


class Mixed(nn.Module):
    """Functional and method activations, 1d/2d/3d and transposed convs, a residual branch."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3)
        self.c2 = nn.Conv2d(2, 4, 3, padding=1)
        self.c3 = nn.Conv3d(2, 2, 1)
        self.up = nn.ConvTranspose2d(4, 4, 2, 2)
        self.res = nn.Conv2d(4, 4, 3, padding=1)  # output also used by the skip connection
        self.pool_then_act = nn.Conv2d(4, 4, 1)  # conv -> pool -> relu: no BN
        self.head = nn.Linear(4, 2)  # feeds softmax: no BN

    def forward(self, x1, x2, x3):
        a = F.leaky_relu(self.c1(x1), 0.1).mean(-1)
        b = self.c2(x2).relu()
        b = torch.tanh(self.up(b))
        r = self.res(b)
        b = F.relu(r) + r
        b = F.relu(F.max_pool2d(self.pool_then_act(b), 2))
        c = F.gelu(self.c3(x3)).mean((2, 3, 4))
        return F.softmax(self.head(b.mean((2, 3)) + a[:, :1] + c[:, :1]), dim=1)


def _inputs(n=4, dtype=torch.float32):
    return (
        torch.randn(n, 2, 8, dtype=dtype),
        torch.randn(n, 2, 6, 6, dtype=dtype),
        torch.randn(n, 2, 3, 3, 3, dtype=dtype),
    )


def test_arbitrary_modules_through_torch_fx():
    model = Mixed().double()
    new = add_batchnorm(model)
    wrapped = {name for name, m in new.named_children() if isinstance(m, nn.Sequential)}
    assert wrapped == {"c1", "c2", "c3", "up"}
    assert [type(m[1]) for m in (new.c1, new.c2, new.c3, new.up)] == [
        batchnorm.BatchNorm1d,
        batchnorm.BatchNorm2d,
        batchnorm.BatchNorm3d,
        batchnorm.BatchNorm2d,
    ]
    assert new.c2[1].weight.dtype == torch.float64 and new.c2[1].layer_name == "c2.1"
    assert new.c2[0].bias is None and new.res.bias is not None and new.head.bias is not None
    # BN sits right before the nonlinearity in the new model's graph. (fx.symbolic_trace would
    # trace into our BN layers' forward, which fx cannot do; treat them as leaves.)
    graph = trace(new, (nn.modules.batchnorm._BatchNorm,), tool="test", advice="")
    bn_nodes = [n for n in graph.nodes if n.op == "call_module" and n.target.endswith(".1")]
    assert len(bn_nodes) == 4
    for n in bn_nodes:
        (user,) = n.users
        assert user.op in ("call_function", "call_method")
    assert new(*_inputs(dtype=torch.float64)).shape == (4, 2)


def test_custom_nonlinearities():
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    model = nn.Sequential(nn.Linear(3, 3), Swish(), nn.Linear(3, 3))
    with pytest.warns(UserWarning, match="nothing was inserted"):
        assert len(add_batchnorm(model)) == 3
    new = add_batchnorm(model, nonlinearities=(*NONLINEARITIES, Swish))
    assert isinstance(new[1], batchnorm.BatchNorm1d) and isinstance(new[2], Swish)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return F.relu(self.fc(x)) if x.sum() > 0 else x


class NoLayers(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_models_name_the_module():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Sequential(nn.Identity(), Branchy()))
    with pytest.raises(ModelTraceError, match=r"submodule '2.1' \(Branchy\).*control flow") as e:
        add_batchnorm(model)
    assert e.value.module_name == "2.1" and e.value.module is not model[2][1]  # a copy
    # an untraceable part without Linear/Conv layers is simply left alone
    new = add_batchnorm(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), NoLayers()))
    assert isinstance(new[1], batchnorm.BatchNorm1d)
    with pytest.raises(ModelTraceError, match="cannot trace the model"):
        add_batchnorm(Branchy())


def test_shared_layers_get_no_bn():
    shared = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = shared
            self.other = nn.Linear(3, 3)

        def forward(self, x):
            return F.relu(self.fc(F.relu(self.fc(x)))) + F.relu(self.other(x))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = add_batchnorm(Twice())
    assert [str(w.message)[:40] for w in caught] == ["add_batchnorm: layer 'fc' (Linear) is ca"]
    assert isinstance(new.fc, nn.Linear) and isinstance(new.other, nn.Sequential)


def test_lazy_layers_must_be_initialized():
    with pytest.raises(ValueError, match="lazy layer '0' is not initialized"):
        add_batchnorm(nn.Sequential(nn.LazyLinear(3), nn.ReLU()))


def test_algorithm_2_end_to_end():
    """Alg. 2 with the tools: add BN, train, estimate population statistics, fold, export."""
    torch.manual_seed(0)
    net = add_batchnorm(
        nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 3),
        )
    )  # fmt: skip
    centers = torch.randn(3, 1, 8, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def batch(n=32):
        y = torch.randint(0, 3, (n,))
        return centers[y] + 0.5 * torch.randn(n, 1, 8, 8), y

    for _ in range(60):
        x, y = batch()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = recalibrate(net, (batch() for _ in range(20)), "pooled")
    assert [x.samples for x in report.layers] == [20 * 32 * 64, 20 * 32 * 9, 20 * 32]
    net.eval()
    x, y = batch(200)
    assert (net(x).argmax(1) == y).float().mean() > 0.9  # it learned, and eval mode works
    result = fold(net, x)
    assert len(result.folded) == 3 and result.max_rel_diff <= FOLD_F32_REL
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.model.modules())
