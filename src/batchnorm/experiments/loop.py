"""The one training loop of every experiment: resume, train, evaluate, checkpoint, stop.

An experiment plugs in through a :class:`Task`: one network with its optimizer and data, which
knows how to take a training step, what it measured since the last evaluation, and how to evaluate
itself. :func:`train` does everything else, the same way for every study:

1. claims the run folder and writes or checks its ``config.json`` (:func:`~.runs.open_run`);
2. resumes from ``checkpoint.pt`` if there is one (a finished or stopped run is not retrained);
   a folder kept without its checkpoint (as ``results/`` keeps them) whose ``metrics.jsonl``
   ends at the last step or with a divergence is complete too (and is not measured again by
   ``task.finish``, which needs the trained network); anything else without a checkpoint trains
   from step 0;
3. evaluates at step 0, then trains; at each of the task's evaluation steps it records
   ``{"step", **task.train_metrics(...), **task.evaluate(...), "train_s"}`` and checkpoints the
   task's state with the metrics so far (so a checkpoint and its metrics never disagree);
4. stops early, cleanly, when a training step returns a reason (a diverged network): the last
   record carries ``"diverged": reason`` and the run counts as complete;
5. calls ``task.finish(run_dir)`` (measurements of the final network) and returns.

A run stopped at any point (Ctrl-C, SIGKILL, power loss) and started again with the same settings
continues from its last checkpoint and ends with the same metrics as an uninterrupted one (timing
fields, whose names end in ``_s``, aside), provided the task's state holds everything its steps
depend on.

Under ``torchrun`` (:class:`~.runs.Ranks`) every rank runs the loop and trains its slice of each
batch; only rank 0 evaluates and writes, while the others wait for it, and an error on rank 0 is
raised on every rank (no rank is left waiting in a collective).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Protocol

from .. import runfiles
from . import runs

__all__ = ["CHECKPOINT_VERSION", "Task", "train"]

# 2: the checkpoint of the shared loop ({"version", "step", "metrics", "stopped", "train_s",
# "task"}); 1 was each experiment's own.
CHECKPOINT_VERSION = 2
_TICK = 50  # steps between progress updates


class Task(Protocol):
    """One run of an experiment: a network, its optimizer and data, and how to train it."""

    name: str  # shown beside the progress
    steps: int  # training steps in all
    progress_keys: tuple[str, ...]  # record fields shown with the progress

    def evaluation_steps(self) -> Collection[int]:
        """The steps after which the run is evaluated and checkpointed (the last one included)."""
        ...

    def state_dict(self) -> dict:
        """Everything the next steps depend on (models, optimizers, RNG state, counters)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...

    def prepare(self, ranks: runs.Ranks) -> None:
        """Called once before the first step of a session (wrap the model for DDP, ...)."""
        ...

    def train_step(self, step: int, ranks: runs.Ranks) -> str | None:
        """Train step ``step`` (1-based); return ``None``, or why the run must stop here."""
        ...

    def train_metrics(self, step: int, ranks: runs.Ranks) -> dict:
        """What training measured since the last evaluation; called on every rank (it may sum
        over them), it also resets those counters."""
        ...

    def evaluate(self, step: int) -> dict:
        """The measurements of the network after ``step`` (rank 0 only)."""
        ...

    def finish(self, run_dir: Path) -> None:
        """After the last step (also when a complete run is started again; rank 0 only)."""
        ...


def train(
    task: Task,
    run_dir: str | os.PathLike,
    document: Mapping,
    *,
    seed: int,
    threads: int,
    processes: int,
    source: str,
    derived: tuple[str, ...] = (),
    progress: bool | Callable[[int], None] = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Train ``task`` in ``run_dir`` (or resume it); return ``run_dir``.

    ``document`` is the run's ``config.json`` (:func:`batchnorm.runfiles.config_document`;
    ``derived`` names settings in it that are computed from others and not compared on resume).
    ``progress``: a tqdm bar (True), a line per evaluation through ``echo`` (False), or a function
    called with the current step now and then (a worker of :func:`~.runs.run_parallel`).
    """
    run_dir = Path(run_dir)
    ranks = runs.Ranks()
    ranks.check(processes)
    with runs.open_run(run_dir, document, threads=threads, derived=derived):
        return _Loop(task, run_dir, ranks, progress, echo).run(seed, source)


class _Loop:
    def __init__(self, task: Task, run_dir: Path, ranks: runs.Ranks, progress, echo) -> None:
        self.task, self.run_dir, self.ranks, self.echo = task, run_dir, ranks, echo
        self.records: list[dict] = []
        self.train_s = 0.0
        self.stopped: dict | None = None
        self.bar = None
        self.tb = None
        self.report = progress if callable(progress) else None
        self.show_bar = progress is True and ranks.writer
        self.lines = progress is False and ranks.writer
        self.kept = False  # complete by its metrics alone: a folder kept without its checkpoint

    def run(self, seed: int, source: str) -> Path:
        task, ranks = self.task, self.ranks
        start = self._resume()
        ranks.barrier()  # every rank has read the checkpoint before rank 0 writes the next one
        if start >= task.steps or self.stopped:
            if ranks.writer:
                how = (
                    f"diverged at step {self.stopped['step']}"
                    if self.stopped
                    else f"{task.steps} steps"
                )
                kept = "; kept without its checkpoint" if self.kept else ""
                self.echo(f"{self.run_dir}: already complete ({how}{kept})")
                if not self.kept:
                    task.finish(self.run_dir)
            return self.run_dir
        task.prepare(ranks)
        if ranks.writer:
            runs.start_session(self.run_dir, seed=seed, resumed_from=start, source=source)
            if start:
                self.echo(f"{self.run_dir}: resuming at step {start} of {task.steps}")
            self.tb = runs.tensorboard(self.run_dir, start)
        if self.show_bar:
            self.bar = runs.progress_bar(task.steps, start, task.name)
        try:
            self._train(start)
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.tb is not None:
                self.tb.close()
        if ranks.writer:
            task.finish(self.run_dir)
        return self.run_dir

    def _resume(self) -> int:
        path = self.run_dir / runfiles.CHECKPOINT
        state = runs.load_checkpoint(path, CHECKPOINT_VERSION)
        if state is None:
            return self._kept()
        self.task.load_state_dict(state["task"])
        self.records, self.train_s, self.stopped = (
            state["metrics"],
            state["train_s"],
            state["stopped"],
        )
        if self.ranks.writer:  # metrics written after the checkpoint may be newer
            runs.write_metrics(self.run_dir, self.records)
        return state["step"]

    def _kept(self) -> int:
        """Without a checkpoint: the last step if ``metrics.jsonl`` shows a finished run (its last
        record at the last step, or a divergence), else 0 (train from the start)."""
        if not (self.run_dir / runfiles.METRICS).is_file():
            return 0
        records, _ = runfiles.read_records(self.run_dir)
        last = records[-1] if records else {}
        if "diverged" in last:
            self.stopped = {"step": last["step"], "reason": last["diverged"]}
        elif last.get("step") != self.task.steps:
            return 0
        self.records, self.train_s, self.kept = records, last.get("train_s", 0.0), True
        return last["step"]

    def _train(self, start: int) -> None:
        task, ranks = self.task, self.ranks
        evals = set(task.evaluation_steps())
        if self.report is not None:
            self.report(start)
        if start == 0:
            self._evaluate(0)
        for step in range(start + 1, task.steps + 1):
            t0 = time.perf_counter()
            reason = task.train_step(step, ranks)
            if reason is not None:
                self._stop(step, reason)
                break
            self.train_s += time.perf_counter() - t0
            if step in evals:
                self._evaluate(step)
            if step % _TICK == 0:
                if self.bar is not None:
                    self.bar.update(step - self.bar.n)
                if self.report is not None:
                    self.report(step)
        else:
            if self.bar is not None:
                self.bar.update(task.steps - self.bar.n)
        if self.report is not None:
            self.report(task.steps)

    def _evaluate(self, step: int) -> None:
        """Record and checkpoint after ``step``: every rank takes part in the training metrics,
        rank 0 evaluates while the others wait, and shares its failure with them."""
        metrics = self.task.train_metrics(step, self.ranks)
        failure = None
        if self.ranks.writer:
            try:
                rec = {"step": step, **metrics, **self.task.evaluate(step), "train_s": self.train_s}
                self._checkpoint(step, rec)
            except Exception as exc:
                failure = exc
            else:
                self._show(rec)
        self.ranks.agree(failure)

    def _stop(self, step: int, reason: str) -> None:
        """A training step said the run ends here ("reached machine infinity"): a clean end."""
        self.stopped = {"step": step, "reason": reason}
        metrics = self.task.train_metrics(step, self.ranks)
        if self.ranks.writer:
            rec = {"step": step, **metrics, "diverged": reason, "train_s": self.train_s}
            self._checkpoint(step, rec)
            self.echo(f"{self.run_dir}: diverged at step {step} ({reason})")

    def _checkpoint(self, step: int, rec: dict) -> None:
        self.records.append(rec)
        runs.log_scalars(self.tb, rec, step)
        runs.save_checkpoint(
            self.run_dir / runfiles.CHECKPOINT,
            {
                "version": CHECKPOINT_VERSION,
                "step": step,
                "metrics": self.records,
                "stopped": self.stopped,
                "train_s": self.train_s,
                "task": self.task.state_dict(),
            },
        )
        runs.write_metrics(self.run_dir, self.records)

    def _show(self, rec: dict) -> None:
        shown = {k: rec[k] for k in self.task.progress_keys if rec.get(k) is not None}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)
        elif self.lines:
            values = "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
            self.echo(f"{self.task.name}: step {rec['step']:,}/{self.task.steps:,}  {values}")
