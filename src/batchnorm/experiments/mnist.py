"""Figure 1 of the paper (Sec. 4.1): an MLP on MNIST with and without BN, and its activations over time.

The experiment (arXiv:1502.03167, Sec. 4.1), and the choices the paper leaves open:

- Input: the 28×28 image binarized as ``pixel >= 128`` (of 0..255) → 1.0, else 0.0; 784 values.
  # DEVIATION: the paper says "binary" but not how; a fixed threshold at half intensity is the
  # simplest deterministic reading (stochastic binarization would add noise the paper doesn't mention).
- Network: 784 → 100 → 100 → 100 → 10, sigmoid hidden units, softmax + cross-entropy. Every weight
  (and the output layer's) ~ N(0, ``init_std``²), biases 0. The BN network puts our
  :class:`~batchnorm.nn.BatchNorm1d` on each hidden layer's ``Wu`` before the sigmoid and drops the
  hidden biases (Sec. 3.2: the mean subtraction cancels them, β takes their role). Both networks
  start from the *same* weight matrices (same seed, same draws).
- Training: plain SGD (no momentum, no weight decay), mini-batches of 60, 50,000 steps, both
  networks stepped on the same mini-batch at every step. The data order is a pure function of
  ``(seed, step)``: a fresh permutation of the 60,000 training images per epoch (1,000 steps).
- Evaluation every ``eval_every`` steps on the 10,000 test images: the baseline; the BN network in
  inference mode with the *population* statistics of Alg. 2 (a copy of the network, each BN layer in
  ``stats_mode="population"``, statistics reset, ``population_batches`` random training batches of
  size 60 run in training mode without gradients, then ``eval()``), and with the moving-average
  (EMA, momentum ``momentum``) statistics kept during training.
- Figure 1(b, c): the 15th/50th/85th percentiles of each last-hidden-layer unit's sigmoid input on a
  fixed held-out batch (the first ``probe_examples`` test images), both networks in inference mode
  (the BN network with population statistics). ``probe_unit`` is the unit drawn in the figure;
  every unit's percentiles are recorded too.

Data-parallel (``torchrun --nproc-per-node N``, :class:`~.runs.Ranks`): every step's global batch
of 60 is split into contiguous slices, one per process, the two networks are wrapped in
``DistributedDataParallel``, and the BN network's statistics are synchronized over the processes
(``bn_sync``, the default: the same normalization as one process) or per process. Only rank 0
evaluates and writes.

Runs survive interruption: after each evaluation the models, optimizers, RNG state and the metrics
so far are checkpointed atomically, and the same command resumes from there and produces the same
metrics as an uninterrupted run (timing fields, whose names end in ``_s``, aside).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import data
from .._atomic import write_text
from ..nn import BatchNorm1d
from ..tools import name_layers
from . import runs
from .runs import (
    CHECKPOINT,
    CheckpointError,
    DataOrder,
    RunConfigMismatchError,
    RunError,
    load_records,
    population_copy,
)

__all__ = [
    "CHECKPOINT",
    "CheckpointError",
    "MnistConfig",
    "MnistData",
    "RunConfigMismatchError",
    "RunError",
    "build_mlp",
    "check_fits",
    "load_records",
    "population_copy",
    "prepare_data",
    "run",
    "run_name",
    "sweep",
]

_CHECKPOINT_VERSION = 1
QUANTILES = (0.15, 0.50, 0.85)
SENSITIVITY_BATCHES = (5, 20, 100, 500)
# The 28×28 grayscale sets whose 784 binarized pixels the MLP takes.
DATASETS = tuple(name for name, spec in data.DATASETS.items() if spec.format == "idx")


@dataclass(frozen=True)
class MnistConfig:
    """Every setting of one run; saved to ``config.json`` and compared on resume."""

    steps: int = 50_000  # SGD steps (the paper: 50,000)
    batch_size: int = 60  # examples per mini-batch (the paper: 60)
    # Not in the paper (see the report for the sensitivity sweep that backs these):
    lr: float = 0.5  # plain SGD learning rate, the same for both networks
    init_std: float = 0.01  # std of the Gaussian initial weights ("small random Gaussian values")
    eps: float = 1e-5  # BN's ε (torch's default)
    momentum: float = 0.1  # EMA momentum of the running statistics (torch's default)
    seed: int = 0  # initial weights, data order and population batches derive from it
    eval_every: int = 500  # steps between test evaluations (and checkpoints)
    population_batches: int = 100  # training batches of the Alg. 2 population pass (6,000 images)
    probe_unit: int = 0  # the last-hidden-layer unit drawn in Figure 1(b, c)
    probe_examples: int = 1000  # the fixed held-out batch: the first N test images
    binarize_threshold: int = 128  # pixel >= threshold -> 1.0
    hidden: tuple[int, ...] = (100, 100, 100)
    dataset: str = "mnist"
    # Intra-op threads while the run trains. At 60×100 activations a second thread gains about 20%
    # on a quiet machine, but on a busy one spinning OpenMP threads made each step several times
    # slower (benchmarks/README.md); one thread is predictable. Part of the config because matmul
    # results may differ in the last bit between thread counts, and a resumed run must match.
    threads: int = 1
    # Data-parallel runs (torchrun): the number of processes, and whether BN statistics are
    # synchronized over them (else each process normalizes its slice of the batch). Saved only
    # when processes > 1, so a single-process config.json is what it always was.
    processes: int = 1
    bn_sync: bool = True

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"MnistConfig: {msg}")

        for name in (
            "steps",
            "batch_size",
            "eval_every",
            "population_batches",
            "probe_examples",
            "threads",
            "processes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise bad(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size < 2:
            raise bad(f"batch_size must be at least 2 (BN needs m > 1), got {self.batch_size}")
        for name in ("lr", "init_std", "eps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and value < float("inf")):
                raise bad(f"{name} must be a positive finite number, got {value!r}")
        if not 0 <= self.momentum <= 1:
            raise bad(f"momentum must be in [0, 1], got {self.momentum}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise bad(f"hidden must be a non-empty list of positive sizes, got {self.hidden}")
        if not 0 <= self.probe_unit < self.hidden[-1]:
            raise bad(f"probe_unit must be in [0, {self.hidden[-1]}), got {self.probe_unit}")
        if not 0 < self.binarize_threshold <= 255:
            raise bad(f"binarize_threshold must be in 1..255, got {self.binarize_threshold}")
        if self.dataset not in DATASETS:
            raise bad(f"dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.processes > self.batch_size:
            raise bad(f"{self.processes} processes cannot share a batch of {self.batch_size}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        if self.processes == 1:
            del d["processes"], d["bn_sync"]
        return d


# -- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MnistData:
    """The binarized data set, flattened: float32 ``(N, 784)`` inputs in {0, 1}, int64 labels."""

    name: str
    threshold: int
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    source: str


def prepare_data(dataset: data.Dataset, threshold: int = 128) -> MnistData:
    """Binarize once (``pixel >= threshold``) into contiguous tensors that batches index directly."""

    def flat(images: Tensor) -> Tensor:
        return (images.reshape(len(images), -1) >= threshold).float().contiguous()

    return MnistData(
        dataset.name,
        threshold,
        flat(dataset.train.images),
        dataset.train.labels.contiguous(),
        flat(dataset.test.images),
        dataset.test.labels.contiguous(),
        str(dataset.source),
    )


# -- models -------------------------------------------------------------------------------------


def build_mlp(
    cfg: MnistConfig, *, bn: bool, in_features: int = 784, classes: int = 10
) -> nn.Sequential:
    """The Figure 1 network; with ``bn``, BN before every hidden sigmoid and no hidden biases.

    The weights are drawn from N(0, init_std²) by a generator seeded from ``cfg.seed`` in the same
    order for both variants, so the two networks start from identical weight matrices.
    """
    gen = torch.Generator().manual_seed(runs.derive_seed(cfg.seed, "init"))
    layers: list[nn.Module] = []
    width = in_features
    for h in cfg.hidden:
        layers.append(nn.Linear(width, h, bias=not bn))  # Sec. 3.2: the bias is redundant before BN
        if bn:
            layers.append(BatchNorm1d(h, eps=cfg.eps, momentum=cfg.momentum))
        layers.append(nn.Sigmoid())
        width = h
    layers.append(nn.Linear(width, classes))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, cfg.init_std, generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
    return name_layers(model)


def _sigmoid_input(model: nn.Sequential, x: Tensor) -> Tensor:
    """The input of the last hidden sigmoid (Figure 1(b, c)): ``Wu + b`` or ``BN(Wu)``."""
    last = max(i for i, m in enumerate(model) if isinstance(m, nn.Sigmoid))
    return model[:last](x)


# -- one run ------------------------------------------------------------------------------------


def run_name(cfg: MnistConfig) -> str:
    """The run folder's name: the settings a sweep varies."""
    return f"lr{cfg.lr:g}_std{cfg.init_std:g}_eps{cfg.eps:g}_seed{cfg.seed}"


@dataclass
class _Net:
    name: str
    model: nn.Sequential
    opt: torch.optim.SGD
    train: nn.Module | None = None  # what is trained: the model, or DDP around it
    loss_sum: Tensor = field(default_factory=lambda: torch.zeros(()))  # since the last evaluation
    train_s: float = 0.0  # seconds spent in this network's SGD steps, over all sessions


def _accuracy_and_loss(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x)
        acc = (logits.argmax(1) == y).double().mean().item()
        loss = F.cross_entropy(logits, y).item()
    return acc, loss


def _percentiles(model: nn.Sequential, x: Tensor) -> list[list[float]]:
    with torch.no_grad():
        z = _sigmoid_input(model, x)
        q = torch.quantile(z.double(), torch.tensor(QUANTILES, dtype=torch.float64), dim=0)
    return q.tolist()  # [3][units]


def _population_batches(cfg: MnistConfig, d: MnistData, key: tuple, k: int) -> list[Tensor]:
    """``k`` random training batches (without repeats), drawn by a generator seeded by ``key``."""
    gen = torch.Generator().manual_seed(runs.derive_seed(cfg.seed, *key))
    idx = torch.randperm(len(d.x_train), generator=gen)[: k * cfg.batch_size]
    return list(d.x_train[idx].split(cfg.batch_size))


def _evaluate(
    cfg: MnistConfig, d: MnistData, step: int, plain: _Net, bn: _Net, steps_since: int
) -> dict:
    start = time.perf_counter()
    rec: dict = {"step": step, "epoch": step * cfg.batch_size / len(d.x_train)}
    for net in (plain, bn):
        rec[f"train_loss_{net.name}"] = (net.loss_sum / steps_since).item() if steps_since else None
        net.loss_sum.zero_()
    probe = d.x_test[: cfg.probe_examples]
    try:
        plain.model.eval()
        rec["test_acc_plain"], rec["test_loss_plain"] = _accuracy_and_loss(
            plain.model, d.x_test, d.y_test
        )
        pct_plain = _percentiles(plain.model, probe)
        bn.model.eval()
        rec["test_acc_bn_ema"], rec["test_loss_bn_ema"] = _accuracy_and_loss(
            bn.model, d.x_test, d.y_test
        )
    finally:
        plain.model.train()
        bn.model.train()
    pop = population_copy(
        bn.model, _population_batches(cfg, d, ("population", step), cfg.population_batches)
    )
    rec["test_acc_bn_population"], rec["test_loss_bn_population"] = _accuracy_and_loss(
        pop, d.x_test, d.y_test
    )
    pct_bn = _percentiles(pop, probe)
    for name, pct in (("plain", pct_plain), ("bn", pct_bn)):
        for q, row in zip(QUANTILES, pct, strict=True):
            rec[f"unit_p{round(q * 100)}_{name}"] = row[cfg.probe_unit]
    for name, pct in (("plain", pct_plain), ("bn", pct_bn)):
        for q, row in zip(QUANTILES, pct, strict=True):
            rec[f"layer_p{round(q * 100)}_{name}"] = row
    rec["eval_s"] = time.perf_counter() - start
    return rec


def _sensitivity(cfg: MnistConfig, d: MnistData, bn_model: nn.Module) -> dict:
    """Test accuracy of the final BN network for several sizes of the population pass."""
    out = {"step": cfg.steps, "batch_size": cfg.batch_size, "accuracy": {}}
    for k in SENSITIVITY_BATCHES:
        accs = []
        for rep in range(3):
            pop = population_copy(bn_model, _population_batches(cfg, d, ("sensitivity", k, rep), k))
            accs.append(_accuracy_and_loss(pop, d.x_test, d.y_test)[0])
        out["accuracy"][str(k)] = accs
    return out


def check_fits(cfg: MnistConfig, train_images: int, test_images: int) -> None:
    """Raise :class:`~.runs.ConfigError` if a size in ``cfg`` exceeds the data set's."""
    runs.check_batch_sizes(cfg.batch_size, cfg.population_batches, train_images)
    if cfg.probe_examples > test_images:
        raise runs.ConfigError(
            f"probe_examples = {cfg.probe_examples} exceeds the {test_images} test images"
        )


def run(
    cfg: MnistConfig,
    run_dir: str | os.PathLike,
    d: MnistData,
    *,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Train both networks (or resume), evaluate every ``cfg.eval_every`` steps; return ``run_dir``.

    Writes ``config.json``, ``env.json``, ``metrics.jsonl``/``.csv``, ``population_batches.json``,
    ``checkpoint.pt`` and TensorBoard events under ``tb/``. Plots and the report are drawn from
    these files by :mod:`batchnorm.reporting.mnist`.
    """
    run_dir = Path(run_dir)
    runs.Ranks().check(cfg.processes)
    if d.name != cfg.dataset or d.threshold != cfg.binarize_threshold:
        raise ValueError(
            f"the data were prepared for {d.name!r} with threshold {d.threshold}, but the config asks "
            f"for {cfg.dataset!r} with threshold {cfg.binarize_threshold}"
        )
    check_fits(cfg, len(d.x_train), len(d.x_test))
    with runs.open_run(run_dir, cfg.to_dict(), threads=cfg.threads):
        return _run(cfg, run_dir, d, progress, echo)


def _run(
    cfg: MnistConfig, run_dir: Path, d: MnistData, progress: bool, echo: Callable[[str], None]
) -> Path:
    plain, bn = (
        _Net(name, model, torch.optim.SGD(model.parameters(), lr=cfg.lr))
        for name, model in (("plain", build_mlp(cfg, bn=False)), ("bn", build_mlp(cfg, bn=True)))
    )
    torch.manual_seed(cfg.seed)  # nothing draws from it today; saved and restored all the same
    ranks = runs.Ranks()

    ckpt_path = run_dir / CHECKPOINT
    records: list[dict] = []
    start_step = 0
    state = runs.load_checkpoint(ckpt_path, _CHECKPOINT_VERSION)
    if state is not None:
        for net in (plain, bn):
            net.model.load_state_dict(state["models"][net.name])
            net.opt.load_state_dict(state["optimizers"][net.name])
            net.train_s = state["train_s"][net.name]
        torch.set_rng_state(state["rng_torch"])
        records = state["metrics"]
        start_step = state["step"]
        if ranks.writer:  # metrics written after the checkpoint may be newer
            runs.write_metrics(run_dir, records)
    ranks.barrier()  # every rank has read the checkpoint before rank 0 writes the next one
    if start_step >= cfg.steps:
        if ranks.writer:
            echo(f"{run_dir}: already complete ({cfg.steps} steps)")
            _write_sensitivity(run_dir, cfg, d, bn.model)
        return run_dir
    for net in (plain, bn):
        net.train = ranks.wrap(net.model, sync_bn=cfg.bn_sync)
    if not ranks.writer:  # trains its share, writes nothing
        _train(cfg, d, ranks, plain, bn, start_step)
        return run_dir
    runs.start_session(run_dir, seed=cfg.seed, resumed_from=start_step, source=d.source)
    if start_step:
        echo(f"{run_dir}: resuming at step {start_step} of {cfg.steps}")

    tb = runs.tensorboard(run_dir, start_step)
    bar = runs.progress_bar(cfg.steps, start_step, run_name(cfg)) if progress else None

    def checkpoint(step: int, rec: dict) -> None:
        records.append(rec)
        runs.log_scalars(tb, rec, step)
        runs.save_checkpoint(
            ckpt_path,
            {
                "version": _CHECKPOINT_VERSION,
                "step": step,
                "models": {n.name: n.model.state_dict() for n in (plain, bn)},
                "optimizers": {n.name: n.opt.state_dict() for n in (plain, bn)},
                "train_s": {n.name: n.train_s for n in (plain, bn)},
                "rng_torch": torch.get_rng_state(),
                "metrics": records,
            },
        )
        runs.write_metrics(run_dir, records)

    try:
        if start_step == 0:
            checkpoint(0, _evaluate(cfg, d, 0, plain, bn, 0))
        last_eval = start_step

        def evaluate(step: int) -> None:
            nonlocal last_eval
            rec = _evaluate(cfg, d, step, plain, bn, step - last_eval)
            rec["train_plain_s"], rec["train_bn_s"] = plain.train_s, bn.train_s
            last_eval = step
            checkpoint(step, rec)
            if bar is not None:
                bar.set_postfix(
                    bn=f"{rec['test_acc_bn_population']:.4f}",
                    plain=f"{rec['test_acc_plain']:.4f}",
                    refresh=False,
                )

        def tick(step: int) -> None:
            if bar is not None and step % 50 == 0:
                bar.update(step - bar.n)

        _train(cfg, d, ranks, plain, bn, start_step, evaluate, tick)
        if bar is not None:
            bar.update(cfg.steps - bar.n)
    finally:
        if bar is not None:
            bar.close()
        tb.close()

    _write_sensitivity(run_dir, cfg, d, bn.model)
    return run_dir


def _train(
    cfg: MnistConfig,
    d: MnistData,
    ranks: runs.Ranks,
    plain: _Net,
    bn: _Net,
    start_step: int,
    evaluate: Callable[[int], None] = lambda step: None,
    tick: Callable[[int], None] = lambda step: None,
) -> None:
    """Train both networks from ``start_step`` to the end; ``tick(step)`` after every step.

    Every ``eval_every`` steps and at the last, the training losses are summed over the ranks
    (every rank takes part), then rank 0 calls ``evaluate(step)`` while the others wait for it;
    if it raises, every rank raises (:meth:`~.runs.Ranks.agree`).
    """
    order = DataOrder(len(d.x_train), cfg.batch_size, cfg.seed)
    for step in range(start_step + 1, cfg.steps + 1):
        idx = order.indices(step)
        # index_select: the same rows as x[idx], in a quarter of the time (benchmarks/)
        x, y = d.x_train.index_select(0, idx), d.y_train.index_select(0, idx)
        x, y = ranks.local(x), ranks.local(y)
        for net in (plain, bn):
            t0 = time.perf_counter()
            loss = ranks.loss(net.train(x), y, len(idx))
            net.opt.zero_grad(set_to_none=True)
            loss.backward()
            net.opt.step()
            net.loss_sum += loss.detach()
            net.train_s += time.perf_counter() - t0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if ranks.world > 1:
                totals = ranks.sum([float(net.loss_sum) for net in (plain, bn)])
                for net, total in zip((plain, bn), totals, strict=True):
                    net.loss_sum.fill_(total / ranks.world)  # each share was scaled by world
            failure = None
            if ranks.writer:
                try:
                    evaluate(step)
                except Exception as exc:
                    failure = exc
            for net in (plain, bn):
                net.loss_sum.zero_()  # reported by rank 0's evaluation
            ranks.agree(failure)
        tick(step)


def _write_sensitivity(run_dir: Path, cfg: MnistConfig, d: MnistData, bn_model: nn.Module) -> None:
    path = run_dir / "population_batches.json"
    if not path.exists():
        write_text(path, json.dumps(_sensitivity(cfg, d, bn_model), indent=2) + "\n")


# -- sweeps -------------------------------------------------------------------------------------


def sweep(
    base: MnistConfig,
    *,
    lrs: Sequence[float] = (),
    init_stds: Sequence[float] = (),
    epss: Sequence[float] = (),
    seeds: Sequence[int] = (),
) -> list[MnistConfig]:
    """Every combination of the given values (an empty list keeps the base value), seeds innermost."""
    return [
        replace(base, lr=lr, init_std=std, eps=eps, seed=seed)
        for lr, std, eps, seed in itertools.product(
            lrs or [base.lr], init_stds or [base.init_std], epss or [base.eps], seeds or [base.seed]
        )
    ]
