"""Run folders: what every experiment of :mod:`batchnorm.experiments` writes, checks and resumes.

A run folder holds one training run (one setting, one seed):

- ``config.json``: ``{"config": ..., "versions": ...}``, written once. A later run in the same
  folder must have the same config (:func:`open_run` refuses anything else, naming each difference)
  and then resumes.
- ``env.json``: ``{"sessions": [...]}``, one entry per session (start, resumed-from step, library
  versions, git revision, command, CPU, threads, kernel status, data source).
- ``metrics.jsonl`` (one JSON object per evaluation) and ``metrics.csv`` (its scalar columns),
  rewritten atomically after every evaluation; plots and reports are drawn from these alone.
- ``checkpoint.pt``: written atomically after every evaluation, read back with
  ``torch.load(..., weights_only=True)``; it holds the metrics so far, so a checkpoint and its
  metrics never disagree.
- ``tb/``: TensorBoard events of every numeric metric.
- ``.lock``: an advisory lock held while a process trains the run (:func:`open_run`).

Data order and randomness: :class:`DataOrder` makes the *global* mini-batch of every step a pure
function of ``(seed, step)``, and :func:`derive_seed` gives independent seeds for every other
random choice, so a resumed run repeats exactly what an uninterrupted one does, and a
data-parallel run can take its rank's slice of the same global batch.

Data-parallel runs (:class:`Ranks`): under ``torchrun`` every process trains its slice of each
global batch, ``DistributedDataParallel`` averages the gradients, and only rank 0 touches the run
folder (lock, config, metrics, checkpoints, TensorBoard, reports); every rank reads the checkpoint
to resume.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import multiprocessing
import os
import platform
import queue
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from .._atomic import atomic_path, write_text
from ..functional import kernels
from ..tools import convert_from_sync, convert_sync, recalibrate

__all__ = [
    "CHECKPOINT",
    "CheckpointError",
    "DataOrder",
    "Ranks",
    "RunConfigMismatchError",
    "RunError",
    "derive_seed",
    "load_checkpoint",
    "load_records",
    "log_scalars",
    "open_run",
    "population_copy",
    "progress_bar",
    "run_parallel",
    "save_checkpoint",
    "start_session",
    "tensorboard",
    "versions",
    "write_metrics",
]

CHECKPOINT = "checkpoint.pt"


class RunError(ValueError):
    """A run folder cannot be resumed as it is; the message says why and what to do."""


class RunConfigMismatchError(RunError):
    """A run folder already holds a run with different settings."""


class CheckpointError(RunError):
    """A run's checkpoint cannot be read."""


class ConfigError(ValueError):
    """A setting does not fit the data set (a size beyond its images); the message names it."""


def check_batch_sizes(batch_size: int, population_batches: int, train_images: int) -> None:
    """The training batch and the population estimate's batches (distinct training images)
    must fit in the training set."""
    if batch_size > train_images:
        raise ConfigError(f"batch_size = {batch_size} exceeds the {train_images} training images")
    if population_batches * batch_size > train_images:
        raise ConfigError(
            f"population_batches × batch_size = {population_batches} × {batch_size} exceeds the "
            f"{train_images} training images (the population estimate uses distinct images); "
            f"use population_batches ≤ {train_images // batch_size}"
        )


# -- randomness -----------------------------------------------------------------------------------


def derive_seed(seed: int, *parts: object) -> int:
    """An independent 63-bit seed for each (seed, purpose, index), stable across Python versions."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


Shuffle = Literal["examples", "batches"]


class DataOrder:
    """The training batches, a pure function of ``(seed, step)``.

    ``indices(step)`` is the *global* mini-batch of a step: a data-parallel run gives each rank a
    slice of it, so the examples seen per step do not depend on the number of processes. The last
    partial batch of an epoch is dropped (``steps_per_epoch = n // batch_size``).

    ``shuffle`` says how thoroughly:

    - ``"examples"``: a fresh permutation of all examples every epoch, so the mini-batches change
      composition from epoch to epoch.
    - ``"batches"``: the examples are cut into mini-batches once (one permutation per seed), and
      each epoch only reorders these fixed batches: the same examples always meet in a batch.
      This is what "shuffle training examples more thoroughly" (arXiv:1502.03167 Sec. 4.2.1,
      "which prevents the same examples from always appearing in a mini-batch together")
      improves on; it matters for BN, whose output for an example depends on its batch mates.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, *, shuffle: Shuffle = "examples"
    ) -> None:
        if shuffle not in ("examples", "batches"):
            raise ValueError(f"shuffle must be 'examples' or 'batches', got {shuffle!r}")
        if not 0 < batch_size <= n:
            raise ValueError(
                f"batch_size must be in 1..{n} (the number of examples), got {batch_size}"
            )
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.steps_per_epoch = n // batch_size
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)
        if shuffle == "batches":
            gen = torch.Generator().manual_seed(derive_seed(seed, "batches"))
            self._fixed = torch.randperm(n, generator=gen)[: self.steps_per_epoch * batch_size]
            self._fixed = self._fixed.view(self.steps_per_epoch, batch_size)

    def indices(self, step: int) -> Tensor:
        """Indices of the global batch used by training step ``step`` (1-based)."""
        if step < 1:
            raise ValueError(f"steps count from 1, got {step}")
        epoch, pos = divmod(step - 1, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
            size = self.n if self.shuffle == "examples" else self.steps_per_epoch
            self._perm, self._epoch = torch.randperm(size, generator=gen), epoch
        if self.shuffle == "batches":
            return self._fixed[self._perm[pos]]
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]


# -- data-parallel runs ---------------------------------------------------------------------------


class Ranks:
    """This process's place in a data-parallel run under ``torchrun`` (rank 0 of 1 otherwise).

    Started by ``torchrun --nproc-per-node N``, with the process group initialized, every rank
    trains on its contiguous slice of the *same* global batch (:meth:`local`), the models are
    wrapped in ``DistributedDataParallel`` (:meth:`wrap`), and the loss is scaled so that DDP's
    gradient average equals the gradient of the mean loss over the global batch, even when the
    batch does not split evenly (:meth:`loss`). BN statistics are either synchronized over the
    ranks (:class:`~batchnorm.nn.SyncBatchNorm`: each layer normalizes with the statistics of
    the whole global batch, as in a single process) or per rank (each normalizes its own slice;
    DDP broadcasts rank 0's running statistics to the others before every forward). Only rank 0
    writes (:attr:`writer`). In a plain run every method is the identity and nothing
    communicates, so single-process results do not change by a bit.
    """

    def __init__(self) -> None:
        on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if on else 0
        self.world = dist.get_world_size() if on else 1

    @property
    def writer(self) -> bool:
        """Whether this process writes the run folder (rank 0)."""
        return self.rank == 0

    def local(self, batch: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch (the first ranks get one more row
        when it does not split evenly)."""
        return batch if self.world == 1 else batch.tensor_split(self.world)[self.rank]

    def wrap(self, model: nn.Module, *, sync_bn: bool) -> nn.Module:
        """The module to train: ``model`` itself, or (distributed) ``DistributedDataParallel``
        around it, its BN layers first turned into SyncBatchNorm *in place* if ``sync_bn``
        (so ``model`` keeps its parameters, buffers and ``state_dict`` keys)."""
        if self.world == 1:
            return model
        if sync_bn:
            convert_sync(model, inplace=True)
        return nn.parallel.DistributedDataParallel(model)

    def loss(self, logits: Tensor, y: Tensor, global_batch: int) -> Tensor:
        """Cross-entropy of this rank's slice, scaled so that DDP's average over ranks of its
        gradient is the gradient of the mean loss over the global batch."""
        if self.world == 1:
            return F.cross_entropy(logits, y)
        return F.cross_entropy(logits, y, reduction="sum") * (self.world / global_batch)

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the ranks (float64, one all-reduce)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def check(self, processes: int) -> None:
        """Raise ``ValueError`` unless this run has ``processes`` processes (a config's)."""
        if self.world != processes:
            raise ValueError(
                f"the config is for {processes} process(es), but this run has {self.world}; "
                f"start it with torchrun --nproc-per-node {processes}"
            )

    def agree(self, failure: Exception | None) -> None:
        """Raise rank 0's ``failure`` there, and a :class:`RunError` with its message on the
        other ranks (which wait for it: one broadcast), so no rank is left in a collective."""
        message = None if failure is None else f"rank 0 failed: {failure}"
        if self.world > 1:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        if failure is not None:
            raise failure
        if message is not None:
            raise RunError(message)


def population_copy(model: nn.Module, batches: Sequence[Tensor]) -> nn.Module:
    """A copy of ``model`` in eval mode whose BN layers hold the population statistics of Alg. 2.

    :func:`batchnorm.tools.recalibrate` with the paper's estimator runs ``batches`` through the copy
    without gradients, its BN layers in training mode (each normalizes with batch statistics, so
    it sees what the layers below produce during training, as in the paper's N_BN^tr; Dropout
    and the other layers stay in eval mode) and sets E[x] = E_B[μ_B] and Var[x] =
    m/(m−1)·E_B[σ²_B] (Alg. 2 lines 9–10). The original model is untouched. The pass runs in
    this process alone (SyncBatchNorm layers become plain ones in the copy): in a data-parallel
    run, rank 0 evaluates.
    """
    pop = convert_from_sync(model)
    recalibrate(pop, batches, "paper", sync=False)
    return pop.eval()


# -- environment ----------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    import numpy

    return {
        "batchnorm": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def _git_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def start_session(run_dir: Path, *, seed: int, resumed_from: int, source: str) -> None:
    """Append this session (versions, git revision, command, CPU, threads, …) to ``env.json``."""
    session = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from_step": resumed_from,
        "seed": seed,
        "versions": versions(),
        "git_revision": _git_revision(),
        "command": sys.argv,
        "platform": platform.platform(),
        "cpu": _cpu(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bn_kernels": kernels.status(),
        "data_source": source,
    }
    path = run_dir / "env.json"
    sessions = json.loads(path.read_text())["sessions"] if path.exists() else []
    sessions.append(session)
    write_text(path, json.dumps({"sessions": sessions}, indent=2) + "\n")


# -- the run folder -------------------------------------------------------------------------------


@contextlib.contextmanager
def open_run(run_dir: str | os.PathLike, config: Mapping, *, threads: int) -> Iterator[Path]:
    """Claim ``run_dir`` for this process and check (or write) its ``config.json``.

    Creates the folder, takes its lock (:class:`RunError` if another process trains it), refuses a
    folder whose saved config differs from ``config`` (:class:`RunConfigMismatchError`, listing
    every difference; nothing is written), removes temporary files that a hard kill left behind,
    and runs the body with ``threads`` intra-op threads (restored afterwards). In a data-parallel
    run only rank 0 does all this; the others wait for its verdict and share its error.
    """
    run_dir = Path(run_dir)
    ranks = Ranks()
    with contextlib.ExitStack() as stack:
        failure = None
        if ranks.writer:
            try:
                stack.enter_context(_exclusive(run_dir))
                _check_or_write_config(run_dir, dict(config))
            except Exception as exc:  # RunError, or an OSError writing the folder
                failure = exc
            else:
                # A run killed hard (SIGKILL, power loss) in the middle of an atomic write leaves
                # its temporary file behind; the lock guarantees no other process writes one now.
                for part in run_dir.glob(".*.part"):
                    part.unlink()
        ranks.agree(failure)  # the other ranks wait for rank 0's check, and fail with it
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield run_dir
        finally:
            torch.set_num_threads(old)


@contextlib.contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    """Hold an advisory lock on the run folder: two processes must not train the same run.

    The operating system drops the lock when the process dies, however it dies.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock, and the user must not start a run twice
        yield
        return
    with open(run_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"{run_dir} is in use by another process running the same settings; wait for it "
                "to finish, or stop it and run the command again to resume"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_or_write_config(run_dir: Path, config: dict) -> None:
    path = run_dir / "config.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text())["config"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise RunConfigMismatchError(
                f"{path} is not a config this program wrote ({exc}); use another --out folder"
            ) from exc

        # Single-process configs leave out `processes` and `bn_sync` (so their config.json is
        # what it was before data-parallel runs existed): name the one process in a difference.
        def value(cfg: Mapping, k: str):
            return cfg.get(k, 1 if k == "processes" else None)

        diff = [
            f"{k}: saved {value(saved, k)!r}, now {value(config, k)!r}"
            for k in sorted(set(saved) | set(config))
            if saved.get(k) != config.get(k)
        ]
        if diff:
            raise RunConfigMismatchError(
                f"{run_dir} already holds a run with different settings ({'; '.join(diff)}). "
                "Run with the same settings to resume it, or choose another --out folder."
            )
        return
    write_text(path, json.dumps({"config": config, "versions": versions()}, indent=2) + "\n")


# -- checkpoints ----------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save(state)`` atomically: the old checkpoint stays until the new one is complete."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_checkpoint(path: Path, version: int) -> dict | None:
    """The checkpoint at ``path`` (``None`` if there is none), loaded with ``weights_only=True``.

    Raises :class:`CheckpointError` for a file that cannot be read or that another program (or
    another ``version`` of this one) wrote, and says what to do; it never deletes anything.
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        # The first sentence only: torch's messages go on with advice for files of unknown
        # origin (such as weights_only=False), which is wrong for a damaged checkpoint.
        first = (str(exc).split(". ")[0].splitlines() or [""])[0][:200]
        why = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        raise CheckpointError(
            f"{path} cannot be read ({why}). Checkpoints are written atomically, so the file was "
            "damaged or replaced afterwards. Delete it to start this run again from step 0 (its "
            "metrics will be rewritten), or use another --out."
        ) from exc
    if not isinstance(state, dict) or state.get("version") != version:
        raise CheckpointError(
            f"{path} is not a checkpoint of this program (version "
            f"{state.get('version') if isinstance(state, dict) else None!r}); use another --out"
        )
    return state


# -- metrics --------------------------------------------------------------------------------------


def load_records(run_dir: str | os.PathLike) -> list[dict]:
    """The metrics of a run, one dict per evaluation, from ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    """``metrics.jsonl`` (every field) and ``metrics.csv`` (the scalar ones), atomically."""
    write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    scalar_keys = [k for k in records[0] if not isinstance(records[0][k], list)]
    for r in records[1:]:
        scalar_keys += [k for k in r if k not in scalar_keys and not isinstance(r[k], list)]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=scalar_keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    write_text(run_dir / "metrics.csv", out.getvalue())


def tensorboard(run_dir: Path, start_step: int):
    """A TensorBoard writer for ``run_dir/tb``; a resumed run purges events after its checkpoint."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)


def log_scalars(tb, record: Mapping, step: int) -> None:
    """Every numeric field of ``record`` (but ``step``) as a TensorBoard scalar, then flush."""
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            tb.add_scalar(key, value, step)
    tb.flush()


def progress_bar(total: int, initial: int, desc: str):
    """The progress bar of a run (tqdm: steps, rate and ETA)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        desc=desc,
        dynamic_ncols=True,
        mininterval=0.5,
    )


# -- several runs in parallel processes -----------------------------------------------------------


def run_parallel(
    target: Callable[..., None],
    tasks: Sequence[tuple],
    totals: Sequence[int],
    *,
    jobs: int,
    names: Sequence[str],
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> None:
    """Call ``target(*task, progress=report)`` for every task, in up to ``jobs`` worker processes.

    Workers are started with "spawn" (a fresh interpreter each: no state inherited from this
    process), one per task, ``jobs`` at a time. ``target`` must be a module-level function; it
    calls ``report(step)`` now and then, and one progress bar here sums the steps of every task
    (``totals`` are their step counts). A task that raises does not stop the others: at the end
    :class:`RunError` names every failed task (``names``) and why. On ``KeyboardInterrupt`` the
    workers are interrupted too (they stop at their last checkpoint), then it is re-raised.
    """
    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    pending = list(enumerate(tasks))
    active: dict[int, multiprocessing.process.BaseProcess] = {}
    steps = [0] * len(tasks)
    errors: dict[int, str] = {}
    bar = None
    if progress:
        bar = progress_bar(sum(totals), 0, f"{len(tasks)} runs, {jobs} processes")

    def handle(kind: str, i: int, payload: object) -> None:
        if kind == "progress":
            steps[i] = int(payload)
            if bar is not None:
                bar.update(sum(steps) - bar.n)
            return
        proc = active.pop(i, None)
        if proc is not None:
            proc.join()
        if kind == "error":
            errors[i] = str(payload)
            echo(f"{names[i]}: failed")
        elif kind == "interrupted":
            errors[i] = "interrupted"

    try:
        while pending or active:
            while pending and len(active) < jobs:
                i, task = pending.pop(0)
                proc = ctx.Process(
                    target=_worker, args=(target, task, i, messages), name=names[i], daemon=True
                )
                proc.start()
                active[i] = proc
            try:
                handle(*messages.get(timeout=1.0))
                continue
            except queue.Empty:
                pass
            dead = [i for i, proc in active.items() if not proc.is_alive()]
            if dead:
                # a worker flushes its messages before it exits: read them before judging it
                with contextlib.suppress(queue.Empty):
                    while True:
                        handle(*messages.get(timeout=0.5))
                for i in dead:
                    if i in active:
                        code = active.pop(i).exitcode
                        errors[i] = f"its process ended without a result (exit code {code})"
    except KeyboardInterrupt:
        _stop(list(active.values()))
        raise
    finally:
        if bar is not None:
            bar.close()
    if errors:
        raise RunError(
            f"{len(errors)} of {len(tasks)} runs failed:\n"
            + "\n".join(f"  {names[i]}: {errors[i]}" for i in sorted(errors))
        )


def _stop(procs: list) -> None:
    """Interrupt workers like Ctrl-C does (a terminal has already sent them SIGINT too)."""
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)
    for proc in procs:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join()


def _worker(target: Callable[..., None], task: tuple, index: int, messages) -> None:
    def report(step: int) -> None:
        messages.put(("progress", index, step))

    try:
        target(*task, progress=report)
    except KeyboardInterrupt:
        messages.put(("interrupted", index, None))
    except RunError as exc:
        messages.put(("error", index, str(exc)))
    except BaseException:
        messages.put(("error", index, traceback.format_exc()))
    else:
        messages.put(("done", index, None))
