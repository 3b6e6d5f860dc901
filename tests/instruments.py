"""Shared by the instrument tests: small models and an exact picture of everything a measurement
must leave as it found it."""

from __future__ import annotations

import copy
import itertools
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm


def mlp(
    sizes=(6, 5, 5, 4),
    *,
    bn=True,
    dtype=torch.float64,
    act=nn.Tanh,
    bias=None,
    eps=1e-5,
    seed=0,
) -> nn.Sequential:
    """Linear → [BN] → act per hidden layer, then a Linear output layer; float64 by default."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(sizes[:-1]):
        layers.append(nn.Linear(d_in, d_out, bias=(not bn) if bias is None else bias, dtype=dtype))
        if bn:
            layers.append(batchnorm.BatchNorm1d(d_out, eps=eps, dtype=dtype))
        layers.append(act())
    layers.append(nn.Linear(sizes[-2], sizes[-1], dtype=dtype))
    return batchnorm.tools.name_layers(nn.Sequential(*layers))


def batch(n=8, d=6, classes=4, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=dtype), torch.randint(
        0, classes, (n,), generator=gen
    )


def cross_entropy(model, b):
    return F.cross_entropy(model(b[0]), b[1])


def everything(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """A deep picture of the model, the optimizer and the random streams, for exact comparison."""
    out = {
        "params": [(p, p.detach().clone(), p.requires_grad) for p in model.parameters()],
        "grads": [
            (p.grad, None if p.grad is None else p.grad.detach().clone())
            for p in model.parameters()
        ],
        "buffers": [(n, b.clone()) for n, b in model.named_buffers()],
        "modes": [m.training for m in model.modules()],
        "hooks": [
            len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ],
        "cpu_rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state()[1].copy(),  # noqa: NPY002
        "generators": [
            v.get_state()
            for m in model.modules()
            for v in vars(m).values()
            if isinstance(v, torch.Generator)
        ],
    }
    if optimizer is not None:
        out["opt"] = copy.deepcopy(optimizer.state_dict())
        out["opt_hooks"] = (
            len(optimizer._optimizer_step_pre_hooks),
            len(optimizer._optimizer_step_post_hooks),
        )
    return out


def assert_same(before: dict, after: dict) -> None:
    """Bitwise equality of two :func:`everything` pictures (same tensor objects where it matters)."""
    for (p0, v0, rg0), (p1, v1, rg1) in zip(before["params"], after["params"], strict=True):
        assert p0 is p1 and rg0 == rg1 and torch.equal(v0, v1)
    for (g0, v0), (g1, v1) in zip(before["grads"], after["grads"], strict=True):
        assert g0 is g1
        assert (v0 is None and v1 is None) or torch.equal(v0, v1)
    for (n0, b0), (n1, b1) in zip(before["buffers"], after["buffers"], strict=True):
        assert n0 == n1 and torch.equal(b0, b1), n0
    assert before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]
    assert torch.equal(before["cpu_rng"], after["cpu_rng"])
    assert before["py_rng"] == after["py_rng"]
    assert np.array_equal(before["np_rng"], after["np_rng"])
    assert len(before["generators"]) == len(after["generators"])
    for g0, g1 in zip(before["generators"], after["generators"], strict=True):
        assert torch.equal(g0, g1)
    if "opt" in before:
        assert_state_dicts_equal(before["opt"], after["opt"])
        assert before["opt_hooks"] == after["opt_hooks"]


def assert_state_dicts_equal(a, b) -> None:
    """Recursive exact equality of nested dicts/lists holding tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for k in a:
            assert_state_dicts_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_dicts_equal(x, y)
    else:
        assert a == b, (a, b)
