"""One Figure 1 run: train the MLP with plain SGD, evaluate it, record Figure 1(b, c)'s percentiles.

Evaluation every ``eval_every`` steps, on the 10,000 test images (and the validation images, if
any): the network in inference mode — for the BN network with the moving-average statistics kept
during training (``test_acc``) and with the *population* statistics of Alg. 2
(``test_acc_population``: a copy of the network whose BN layers are recalibrated over
``population_batches`` random training batches of 60 with the weights frozen, then ``eval()``).
Figure 1(b, c): the 15th/50th/85th percentiles of each last-hidden-layer unit's sigmoid input on a
fixed held-out batch (the first ``probe_examples`` test images), the BN network with population
statistics; ``probe_unit`` is the unit drawn, every unit is recorded (``layer_p*``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from ... import runfiles
from ..._atomic import write_text
from ..common import accuracy_and_loss, population_copy
from ..runs import DataOrder, Ranks, derive_seed
from .config import MnistConfig
from .data import MnistData
from .model import build_mlp, sigmoid_input

__all__ = ["QUANTILES", "SENSITIVITY_BATCHES", "MnistTask", "run_name"]

QUANTILES = (0.15, 0.50, 0.85)
SENSITIVITY_BATCHES = (5, 20, 100, 500)


def run_name(cfg: MnistConfig) -> str:
    """The run folder's name: the network and the settings a sweep varies."""
    return f"{cfg.network}_lr{cfg.lr:g}_std{cfg.init_std:g}_eps{cfg.eps:g}_seed{cfg.seed}"


class MnistTask:
    """The :class:`~..loop.Task` of one network of Figure 1."""

    def __init__(self, cfg: MnistConfig, d: MnistData) -> None:
        if d.name != cfg.dataset or d.threshold != cfg.binarize_threshold:
            raise ValueError(
                f"the data were prepared for {d.name!r} with threshold {d.threshold}, but the "
                f"config asks for {cfg.dataset!r} with threshold {cfg.binarize_threshold}"
            )
        if len(d.y_val) != cfg.validation:
            raise ValueError(
                f"the data hold {len(d.y_val)} validation images, the config asks for "
                f"{cfg.validation}"
            )
        self.cfg, self.d = cfg, d
        self.name, self.steps = run_name(cfg), cfg.steps
        self.progress_keys = ("test_acc_population", "test_acc") if cfg.bn else ("test_acc",)
        self.model = self.build_model(cfg)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)
        self.trained: nn.Module = self.model  # or DDP around it
        torch.manual_seed(cfg.seed)  # nothing draws from it today; saved and restored all the same
        self.order = DataOrder(len(d.x_train), cfg.batch_size, cfg.seed)
        self.loss_sum = torch.zeros(())  # since the last evaluation
        self.since = 0

    def build_model(self, cfg: MnistConfig) -> nn.Module:
        """The run's network (a subclass may build another)."""
        return build_mlp(cfg)

    def evaluation_steps(self) -> set[int]:
        every = self.cfg.eval_every
        return set(range(every, self.steps + 1, every)) | {self.steps}

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "rng_torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_torch"])

    def prepare(self, ranks: Ranks) -> None:
        self.trained = ranks.wrap(self.model, sync_bn=self.cfg.bn_sync)

    def train_step(self, step: int, ranks: Ranks) -> None:
        d = self.d
        idx = self.order.indices(step)
        # index_select: the same rows as x[idx], in a quarter of the time (benchmarks/)
        x, y = d.x_train.index_select(0, idx), d.y_train.index_select(0, idx)
        x, y = ranks.local(x), ranks.local(y)
        loss = ranks.loss(self.trained(x), y, len(idx))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.loss_sum += loss.detach()
        self.since += 1

    def train_metrics(self, step: int, ranks: Ranks) -> dict:
        if ranks.world > 1:  # each rank's share was scaled by world
            (total,) = ranks.sum([float(self.loss_sum)])
            self.loss_sum.fill_(total / ranks.world)
        loss = (self.loss_sum / self.since).item() if self.since else None
        self.loss_sum.zero_()
        self.since = 0
        return {
            "epoch": step * self.cfg.batch_size / len(self.d.x_train),
            "train_loss": loss,
            "clock_s": time.time(),  # when this record was made (seconds since the epoch)
        }

    def _batches(self, key: tuple, k: int) -> list[Tensor]:
        """``k`` random training batches (without repeats), drawn by a generator seeded by ``key``."""
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, *key))
        idx = torch.randperm(len(self.d.x_train), generator=gen)[: k * self.cfg.batch_size]
        return list(self.d.x_train[idx].split(self.cfg.batch_size))

    def _percentiles(self, model: nn.Module, step: int) -> dict:
        """The drawn unit's percentiles (every evaluation) and, every ``layer_every`` steps and
        at the ends, every unit's (rounded to 5 decimals: the run files stay small)."""
        with torch.no_grad():
            z = sigmoid_input(model, self.d.x_test[: self.cfg.probe_examples])
            q = torch.quantile(z.double(), torch.tensor(QUANTILES, dtype=torch.float64), dim=0)
        rows = q.tolist()  # [3][units]
        rec = {}
        for quantile, row in zip(QUANTILES, rows, strict=True):
            rec[f"unit_p{round(quantile * 100)}"] = row[self.cfg.probe_unit]
        if step % self.cfg.layer_every == 0 or step == self.steps:
            for quantile, row in zip(QUANTILES, rows, strict=True):
                rec[f"layer_p{round(quantile * 100)}"] = [round(v, 5) for v in row]
        return rec

    def _measure(self, model: nn.Module, suffix: str) -> dict:
        d, rec = self.d, {}
        splits = [("test", d.x_test, d.y_test)]
        if len(d.y_val):
            splits.insert(0, ("val", d.x_val, d.y_val))
        for split, x, y in splits:
            rec[f"{split}_acc{suffix}"], rec[f"{split}_loss{suffix}"] = accuracy_and_loss(
                model, x, y
            )
        return rec

    def evaluate(self, step: int) -> dict:
        start = time.perf_counter()
        self.model.eval()
        try:
            rec = self._measure(self.model, "")
            if not self.cfg.bn:
                rec |= self._percentiles(self.model, step)
        finally:
            self.model.train()
        if self.cfg.bn:
            pop = population_copy(
                self.model, self._batches(("population", step), self.cfg.population_batches)
            )
            rec |= self._measure(pop, "_population") | self._percentiles(pop, step)
        rec["eval_s"] = time.perf_counter() - start
        return rec

    def finish(self, run_dir: Path) -> None:
        """The BN network's test accuracy for several sizes of the population pass (Alg. 2)."""
        path = run_dir / runfiles.SENSITIVITY
        if not self.cfg.bn or path.exists():
            return
        out = {"step": self.steps, "batch_size": self.cfg.batch_size, "accuracy": {}}
        for k in SENSITIVITY_BATCHES:
            accs = []
            for rep in range(3):
                pop = population_copy(self.model, self._batches(("sensitivity", k, rep), k))
                accs.append(accuracy_and_loss(pop, self.d.x_test, self.d.y_test)[0])
            out["accuracy"][str(k)] = accs
        write_text(path, json.dumps(out, indent=2) + "\n")
