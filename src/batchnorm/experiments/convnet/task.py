"""One run of the convnet study: SGD with momentum on the recipe's schedule, evaluated as it trains.

- **Evaluation** (:func:`evaluation_steps`): accuracy on the test set (the paper's "validation"
  set: it used ImageNet's validation images), and on the validation images held out of the
  training set if ``validation`` > 0. BN networks are evaluated in inference mode with their moving
  averages — "the moving averages can be used instead to track the accuracy of the model as it
  trains" (Sec. 3.1) — and, at :func:`population_steps`, also with the population statistics of
  Alg. 2 (:func:`~..common.population_copy`, the paper's estimator over ``population_batches``
  un-augmented training batches), to show how much the choice matters.
- **Divergence**: a training loss that is not finite or above ``divergence_loss`` (1,000 by
  default; chance is ln 10 ≈ 2.3, and a loss of 1,000 means logits of that size: the weights are
  on their way to "machine infinity"), a weight that is not finite after an update, or a BN layer
  whose batch statistics overflowed (it counts that in ``nonfinite_skips``) ends the run cleanly:
  the step and the reason are recorded, the run counts as complete, and a resumed run does not
  retry it.

The global batch of every step, its augmentation and its Dropout masks are pure functions of
``(seed, step)``, so a resumed run repeats an uninterrupted one exactly. Under ``torchrun`` each
process trains its slice of the same augmented global batch; only the Dropout masks differ from a
single-process run (each rank draws its own from ``(seed, step, rank)``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from ...tools import nonfinite_skips
from ..common import accuracy_and_loss, population_copy
from ..runs import DataOrder, Ranks, derive_seed
from .config import ConvnetConfig
from .data import ConvnetData, make_batch
from .model import build_network

__all__ = ["ConvnetTask", "evaluation_steps", "population_steps", "run_name"]


def run_name(cfg: ConvnetConfig) -> str:
    """The run folder's name: network, its initial learning rate and half-life, the budget when
    it is not the default 10,000 steps, seed."""
    r = cfg.recipe
    budget = "" if cfg.steps == 10_000 else f"_{cfg.steps}steps"
    return f"{cfg.network}_lr{r.lr:g}_hl{r.lr_half_life:g}{budget}_seed{cfg.seed}"


def evaluation_steps(cfg: ConvnetConfig) -> list[int]:
    """The steps after which a run is evaluated (and checkpointed).

    Step 0, then every ``eval_every/4`` steps up to ``4·eval_every`` — where the fast networks
    cross the baseline's accuracy, so their "steps to reach" is resolved to within about 25% —
    then every ``eval_every`` steps, and the last step.
    """
    early = max(1, cfg.eval_every // 4)
    points = set(range(early, 4 * cfg.eval_every + 1, early))
    points |= set(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))
    return [0, *sorted(p for p in points | {cfg.steps} if p <= cfg.steps)]


def population_steps(cfg: ConvnetConfig) -> set[int]:
    """The evaluations that also use the population statistics of Alg. 2 (BN networks): the
    first and the last, and the first at or after every multiple of ``population_every``."""
    evals = evaluation_steps(cfg)
    due = range(cfg.population_every, cfg.steps + 1, cfg.population_every)
    return {0, cfg.steps} | {next(s for s in evals if s >= k) for k in due}


class ConvnetTask:
    """The :class:`~..loop.Task` of one network of the convnet study."""

    def __init__(self, cfg: ConvnetConfig, d: ConvnetData) -> None:
        if d.name != cfg.dataset:
            raise ValueError(f"the data are {d.name!r}, but the config asks for {cfg.dataset!r}")
        if len(d.y_val) != cfg.validation:
            raise ValueError(
                f"the data hold {len(d.y_val)} validation images, the config asks for "
                f"{cfg.validation}"
            )
        self.cfg, self.d, self.recipe = cfg, d, cfg.recipe
        self.name, self.steps = run_name(cfg), cfg.steps
        self.progress_keys = ("test_acc",)
        self.model = build_network(cfg, in_channels=d.in_channels, classes=d.classes)
        self.opt = torch.optim.SGD(
            self.model.parameters(),
            lr=self.recipe.lr,
            momentum=self.recipe.momentum,
            weight_decay=self.recipe.weight_decay,
        )
        self.trained: nn.Module = self.model
        self.order = DataOrder(
            len(d.x_train), cfg.batch_size, cfg.seed, shuffle=self.recipe.shuffle
        )
        self.pop_steps = population_steps(cfg)
        self.loss_sum = self.correct = self.seen = 0.0

    def evaluation_steps(self) -> list[int]:
        return evaluation_steps(self.cfg)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])

    def prepare(self, ranks: Ranks) -> None:
        self.trained = ranks.wrap(self.model, sync_bn=self.cfg.bn_sync)

    def train_step(self, step: int, ranks: Ranks) -> str | None:
        cfg, d = self.cfg, self.d
        for group in self.opt.param_groups:
            group["lr"] = self.recipe.lr_at(step)
        idx = self.order.indices(step)
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "augment", step))
        # the global batch, augmented as in one process; then this rank's slice of it
        x, y = make_batch(d, idx, self.recipe, gen), d.y_train.index_select(0, idx)
        x, y = ranks.local(x), ranks.local(y)
        # Dropout: one process draws the masks of its batch; a rank draws its own, else every
        # slice would get the same masks (so data-parallel Dropout differs from one process)
        key = ("dropout", step) if ranks.world == 1 else ("dropout", step, ranks.rank)
        torch.manual_seed(derive_seed(cfg.seed, *key))
        logits = self.trained(x)
        loss = ranks.loss(logits, y, len(idx))
        overflowed = sum(nonfinite_skips(self.model).values()) > 0
        value = loss.item()
        if ranks.world > 1:  # the mean loss of the global batch; every rank stops together
            total, flags = ranks.sum([value, float(overflowed)])
            value, overflowed = total / ranks.world, flags > 0
        if not math.isfinite(value) or value > cfg.divergence_loss:
            return f"training loss {value:.4g}"
        if overflowed:
            return "a BN layer's batch statistics overflowed"
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            return "a weight is not finite after the update"
        self.loss_sum += value * len(idx)
        self.correct += float((logits.detach().argmax(1) == y).sum())
        self.seen += len(idx)
        return None

    def train_metrics(self, step: int, ranks: Ranks) -> dict:
        if ranks.world > 1:
            (self.correct,) = ranks.sum([self.correct])  # this rank's count, summed over ranks
        seen = self.seen
        rec = {
            "epoch": step * self.cfg.batch_size / len(self.d.x_train),
            "lr": self.recipe.lr_at(max(step, 1)),
            "train_loss": self.loss_sum / seen if seen else None,
            "train_acc": self.correct / seen if seen else None,
            "clock_s": time.time(),  # when this record was made (seconds since the epoch)
        }
        self.loss_sum = self.correct = self.seen = 0.0
        if step == 0:
            rec["parameters"] = sum(p.numel() for p in self.model.parameters())
        return rec

    def _population_batches(self, step: int) -> list[Tensor]:
        """``population_batches`` random un-augmented training batches, from ``(seed, step)``."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "population", step))
        idx = torch.randperm(len(self.d.x_train), generator=gen)
        idx = idx[: cfg.population_batches * cfg.batch_size]
        return [make_batch(self.d, i, self.recipe, None) for i in idx.split(cfg.batch_size)]

    def _measure(self, model: nn.Module, suffix: str) -> dict:
        d, n = self.d, self.cfg.test_examples or len(self.d.y_test)
        rec = {}
        splits = [("test", d.x_test[:n], d.y_test[:n])]
        if len(d.y_val):
            splits.insert(0, ("val", d.x_val, d.y_val))
        for split, x, y in splits:
            rec[f"{split}_acc{suffix}"], rec[f"{split}_loss{suffix}"] = accuracy_and_loss(
                model, x, y, chunk=1000
            )
        return rec

    def evaluate(self, step: int) -> dict:
        start = time.perf_counter()
        self.model.eval()
        try:
            rec = self._measure(self.model, "")
        finally:
            self.model.train()
        if self.cfg.net.bn and step in self.pop_steps:
            pop = population_copy(self.model, self._population_batches(step))
            rec |= self._measure(pop, "_population")
        rec["eval_s"] = time.perf_counter() - start
        return rec

    def finish(self, run_dir: Path) -> None:
        pass
