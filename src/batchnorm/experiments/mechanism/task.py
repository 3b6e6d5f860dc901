"""One run of the mechanism study: the Figure 1 run's training, with the instruments reading.

At every evaluation (every ``eval_every`` steps, and step 0): validation and test accuracy, and
``train_acc`` on the first 10,000 training images, the network in inference mode (BN with its
moving averages, no Dropout). With ``instruments`` on, at every ``instrument_every`` steps,
on the batch the run trains on next (the instruments restore everything, so the run goes on
bitwise as without them, :mod:`batchnorm.tools.instruments`):

- ``ics_rel`` / ``ics_cos``: Santurkar et al.'s ICS of every linear layer with layers below it
  (all but the first), ‖G_k − G'_k‖ / ‖G_k‖ and cos(G_k, G'_k), the update being this run's SGD
  step (:func:`~batchnorm.tools.internal_covariate_shift`);
- ``beta``, ``loss_var``, ``grad_var``: the loss and gradient along the gradient step at
  lr × [0.05, 4] (:func:`~batchnorm.tools.smoothness`);
- ``w_norm`` (every evaluation): the Frobenius norm of every hidden layer's weight; at step 0
  ``scale_weight_grad_error`` / ``scale_input_grad_error``: Sec. 3.3's scale check
  (:func:`~batchnorm.tools.scale_check`, W → aW, a = 0.1 and 10);
- the distributions of every hidden sigmoid's input on the first ``probe_examples`` validation
  images, in training mode (what the layers above see while training: noisy BN's noise on, BN
  with the probe batch's statistics), kept by a :class:`~batchnorm.tools.ShiftTracker` that is
  checkpointed with the run; at the end its drift summaries go to ``shift.json``.

The networks (:meth:`MechanismTask.build_model`): the Figure 1 MLP of ``hidden`` sigmoid layers,
with no BN, BN, noisy BN, ghost BN (:class:`~batchnorm.nn.GhostBatchNorm1d`) or Batch Renorm
(:class:`~batchnorm.nn.BatchRenorm1d`, :data:`RENORM`) over ghost batches of ``virtual_batch``
examples; Glorot's initialization instead of N(0, init_std²) with ``init = "glorot"``; Dropout
after every hidden sigmoid with ``dropout`` > 0 (drawn from the run's seeded, checkpointed torch
generator); the hidden weights multiplied by ``weight_scale`` after the draw, and trained at
their own learning rate ``hidden_lr`` (if not 0) while BN's parameters and the output layer keep
``lr``.

A non-finite training loss stops the run as diverged (the loop's record says so).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ... import runfiles
from ..._atomic import write_text
from ...nn import BatchRenorm1d, GhostBatchNorm1d, NoisyBatchNorm1d
from ...tools import (
    ShiftTracker,
    internal_covariate_shift,
    name_layers,
    scale_check,
    smoothness,
)
from ..common import accuracy_and_loss
from ..mnist.model import build_mlp
from ..mnist.task import MnistTask
from ..runs import derive_seed
from .config import MechanismConfig

__all__ = ["RENORM", "SHIFT", "MechanismTask", "run_name"]

SHIFT = runfiles.SHIFT
SCALES = (0.1, 10.0)  # the weight scales a of the step-0 scale check (Sec. 3.3)
# Batch Renorm's bounds (Ioffe 2017's final r_max, d_max) after 500 steps of plain (ghost) BN
RENORM = {"r_max": 3.0, "d_max": 5.0, "warmup": 500}
TRAIN_PROBE = 10_000  # training images of train_acc
DEFAULT_EPS = MechanismConfig().eps  # run names mention BN's eps only when it is another


def run_name(cfg: MechanismConfig) -> str:
    noise = f"_noise{cfg.noise_scale:g}-{cfg.noise_shift:g}" if cfg.network == "noisy" else ""
    ghost = str(cfg.virtual_batch) if cfg.virtual_batch else ""
    init = "_glorot" if cfg.init == "glorot" else f"_std{cfg.init_std:g}"
    drop = f"_drop{cfg.dropout:g}" if cfg.dropout else ""
    scale = f"_wscale{cfg.weight_scale:g}" if cfg.weight_scale != 1.0 else ""
    hidden_lr = f"_hlr{cfg.hidden_lr:g}" if cfg.hidden_lr else ""
    eps = f"_eps{cfg.eps:g}" if cfg.eps != DEFAULT_EPS else ""
    return (
        f"{cfg.network}{ghost}{noise}_depth{len(cfg.hidden)}_lr{cfg.lr:g}{hidden_lr}{init}{scale}"
        f"{eps}{drop}_seed{cfg.seed}"
    )


def hidden_linear(model: nn.Module) -> list[nn.Linear]:
    """The hidden layers' linear maps: every ``nn.Linear`` but the last (the output layer)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


class MechanismTask(MnistTask):
    """The :class:`~..loop.Task` of one network of the mechanism study."""

    def __init__(self, cfg: MechanismConfig, d) -> None:
        super().__init__(cfg, d)
        self.name = run_name(cfg)
        self.progress_keys = ("val_acc",)
        if cfg.hidden_lr:  # the hidden weights at their own learning rate, the rest at lr
            own = {id(m.weight) for m in hidden_linear(self.model)}
            params = list(self.model.parameters())
            self.opt = torch.optim.SGD([
                {"params": [p for p in params if id(p) in own], "lr": cfg.hidden_lr},
                {"params": [p for p in params if id(p) not in own]},
            ], lr=cfg.lr)  # fmt: skip
        probe = d.x_val[: cfg.probe_examples]  # the config holds out at least that many
        self.tracker = ShiftTracker(self.model, [probe], modules=nn.Sigmoid, mode="train")

    def build_model(self, cfg: MechanismConfig) -> nn.Module:
        layers = iter(range(len(cfg.hidden)))
        bn = {"eps": cfg.eps, "momentum": cfg.bn_momentum}
        ghost = {"virtual_batch_size": cfg.virtual_batch}
        norm = {
            "noisy": lambda width: NoisyBatchNorm1d(
                width, **bn, noise_scale=cfg.noise_scale, noise_shift=cfg.noise_shift,
                seed=derive_seed(cfg.seed, "noise", next(layers)),
            ),
            "ghost": lambda width: GhostBatchNorm1d(width, **bn, **ghost),
            "renorm": lambda width: BatchRenorm1d(width, **bn, **ghost, **RENORM),
        }.get(cfg.network)  # fmt: skip
        model = build_mlp(cfg, norm=norm)
        if cfg.init == "glorot":  # redrawn in build_mlp's order: every network of a seed shares it
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "init"))
            with torch.no_grad():
                for m in model:
                    if isinstance(m, nn.Linear):
                        std = (2.0 / (m.in_features + m.out_features)) ** 0.5
                        m.weight.normal_(0.0, std, generator=gen)
        if cfg.weight_scale != 1.0:  # Sec. 3.3's W -> aW, after the draw of either init
            with torch.no_grad():
                for m in hidden_linear(model):
                    m.weight.mul_(cfg.weight_scale)
        if cfg.dropout:
            parts = []
            for m in model:
                parts.append(m)
                if isinstance(m, nn.Sigmoid):
                    parts.append(nn.Dropout(cfg.dropout))
            model = name_layers(nn.Sequential(*parts))
        return model

    def _noisy(self) -> list[NoisyBatchNorm1d]:
        return [m for m in self.model.modules() if isinstance(m, NoisyBatchNorm1d)]

    def state_dict(self) -> dict:
        return super().state_dict() | {
            "tracker": self.tracker.state_dict(),
            "noise": [m.generator.get_state() for m in self._noisy()],
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.tracker.load_state_dict(state["tracker"])
        for m, g in zip(self._noisy(), state["noise"], strict=True):
            m.generator.set_state(g)

    def train_step(self, step: int, ranks) -> str | None:
        super().train_step(step, ranks)
        bad = float(not torch.isfinite(self.loss_sum))  # the sum since the last evaluation
        if ranks.world > 1:  # every rank stops together
            (bad,) = ranks.sum([bad])
        return "the training loss is not finite" if bad else None

    def _linear(self) -> list[nn.Linear]:
        return [m for m in self.model if isinstance(m, nn.Linear)]

    def _instruments(self, step: int) -> dict:
        """ICS and smoothness on the batch the run trains on next; at step 0 also Sec. 3.3's
        scale check of every hidden layer (W → aW for a = 0.1 and 10: the largest relative
        error, over the layers, of a · ∂L/∂(aW) against ∂L/∂W and of the gradient reaching the
        layer's input)."""
        idx = self.order.indices(step + 1)
        batch = (self.d.x_train.index_select(0, idx), self.d.y_train.index_select(0, idx))
        linear = self._linear()
        ics = internal_covariate_shift(self.model, _loss, batch, self.opt, layers=linear[1:])
        smooth = smoothness(self.model, _loss, batch, lr=self.cfg.lr)
        rec = {
            "ics_rel": [round(x.relative, 6) for x in ics.layers],
            "ics_cos": [round(x.cosine, 6) for x in ics.layers],
            "beta": smooth.beta,
            "loss_var": smooth.loss_variation,
            "grad_var": smooth.grad_variation,
        }
        if step == 0:
            checks = scale_check(self.model, _loss, batch, linear[:-1], factors=SCALES).checks
            for key in ("weight_grad_error", "input_grad_error"):
                rec[f"scale_{key}"] = {
                    f"{a:g}": max(getattr(c, key) for c in checks if c.factor == a) for a in SCALES
                }
        return rec

    def evaluate(self, step: int) -> dict:
        start = time.perf_counter()
        self.model.eval()
        try:
            rec = self._measure(self.model, "")
            x, y = self.d.x_train[:TRAIN_PROBE], self.d.y_train[:TRAIN_PROBE]
            rec["train_acc"] = accuracy_and_loss(self.model, x, y)[0]
        finally:
            self.model.train()
        self.tracker.record(step)
        rec["w_norm"] = [round(float(m.weight.detach().norm()), 6) for m in self._linear()[:-1]]
        due = step % self.cfg.instrument_every == 0 and step < self.steps
        if self.cfg.instruments and due:
            rec |= self._instruments(step)
        rec["eval_s"] = time.perf_counter() - start
        return rec

    def finish(self, run_dir: Path) -> None:
        """``shift.json``: every hidden sigmoid input's drift summaries (std units, and the
        activation's own units) over the whole run and from the first evaluation after step 0."""
        report = self.tracker.report()
        out = {"steps": list(self.tracker.steps), "layers": {}}
        for layer in report.layers:
            out["layers"][layer.name] = {
                f"{units}_{window}": vars(layer.summary(start, units))
                for units in ("std", "absolute")
                for window, start in (("whole", None), ("trained", self.cfg.eval_every))
            }
        write_text(run_dir / SHIFT, json.dumps(out, indent=2) + "\n")
