"""Several runs at once, each in its own worker process, with one progress bar for all."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import traceback
from collections.abc import Callable, Sequence

from .errors import RunError
from .logs import progress_bar

__all__ = ["run_parallel"]


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
