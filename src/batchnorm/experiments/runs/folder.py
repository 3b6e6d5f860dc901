"""The run folder: claiming it (one process at a time), its config, its sessions, its checkpoint.

The files are those of :mod:`batchnorm.runfiles`. :func:`open_run` claims a folder for this
process, writes its ``config.json`` (or checks that the saved one has the same settings) and
removes what a hard kill left behind; :func:`save_checkpoint` / :func:`load_checkpoint` write and
read ``checkpoint.pt`` atomically and with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ... import __version__, runfiles
from ..._atomic import atomic_path, write_text
from ...functional import kernels
from .errors import CheckpointError, RunConfigMismatchError, RunError
from .ranks import Ranks

__all__ = [
    "load_checkpoint",
    "open_run",
    "save_checkpoint",
    "start_session",
    "versions",
]


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
    path = run_dir / runfiles.ENV
    sessions = json.loads(path.read_text())["sessions"] if path.exists() else []
    sessions.append(session)
    write_text(path, json.dumps({"sessions": sessions}, indent=2) + "\n")


# -- claiming the folder ------------------------------------------------------------------------------


@contextlib.contextmanager
def open_run(
    run_dir: str | os.PathLike, document: Mapping, *, threads: int, derived: tuple[str, ...] = ()
) -> Iterator[Path]:
    """Claim ``run_dir`` for this process and check (or write) its ``config.json``.

    ``document`` is the new ``config.json`` (:func:`batchnorm.runfiles.config_document`). Creates
    the folder, takes its lock (:class:`RunError` if another process trains it), refuses a folder
    whose saved experiment or settings differ (:class:`RunConfigMismatchError`, naming each
    differing setting once; ``derived`` settings, computed from others, are not compared; nothing
    is written), removes temporary files that a hard kill left behind, and runs the body with
    ``threads`` intra-op threads (restored afterwards). The lock and its file go when the body
    ends. In a data-parallel run only rank 0 does all this; the others wait
    for its verdict and share its error.
    """
    run_dir = Path(run_dir)
    ranks = Ranks()
    with contextlib.ExitStack() as stack:
        failure = None
        if ranks.writer:
            try:
                stack.enter_context(_exclusive(run_dir))
                _check_or_write_config(run_dir, dict(document), derived)
            except (RunError, OSError) as exc:
                failure = exc if isinstance(exc, RunError) else _folder_error(run_dir, exc)
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


def _folder_error(run_dir: Path, exc: OSError) -> RunError:
    why = exc.strerror or type(exc).__name__
    where = exc.filename or run_dir
    return RunError(f"cannot write the run folder {run_dir} ({why}: {where}); choose another --out")


@contextlib.contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    """Hold an advisory lock on the run folder: two processes must not train the same run.

    The operating system drops the lock when the process dies, however it dies; any other exit
    (done, an error, Ctrl-C) also removes the lock file, so a finished folder holds none. Because
    it is removed, a process that opened the file just before may lock a file no longer in the
    folder: after locking, it checks that the path still names the file it locked, and starts
    over if not.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock, and the user must not start a run twice
        yield
        return
    path = run_dir / runfiles.LOCK
    while True:
        f = open(path, "a")  # noqa: SIM115 (held for the whole body)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RunError(
                f"{run_dir} is in use by another process running the same settings; wait for it "
                "to finish, or stop it and run the command again to resume"
            ) from None
        try:
            same = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the holder before us removed it: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still holding the lock
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_or_write_config(run_dir: Path, document: dict, derived: tuple[str, ...]) -> None:
    path = run_dir / runfiles.CONFIG
    if not path.exists():
        write_text(path, json.dumps(document, indent=2) + "\n")
        return
    try:
        saved = runfiles.read_config(run_dir)
    except ValueError as exc:
        raise RunConfigMismatchError(f"{exc}; use another --out folder") from exc
    if saved.get("schema") != document["schema"]:
        raise RunConfigMismatchError(
            f"{run_dir} holds a run in an older format (schema {saved.get('schema', 1)}, this "
            f"version writes {document['schema']}); it can be reported (`batchnorm report`) but "
            "not resumed. Choose another --out folder."
        )
    if saved.get("experiment") != document["experiment"]:
        raise RunConfigMismatchError(
            f"{run_dir} holds a run of another experiment ({saved.get('experiment')!r}); choose "
            "another --out folder"
        )

    # Single-process configs leave out `processes` and `bn_sync` (a config.json is the same with
    # or without data parallelism's settings): name the one process in a difference.
    def value(cfg: Mapping, k: str):
        return cfg.get(k, 1 if k == "processes" else None)

    old = {k: v for k, v in _flatten(saved["config"]).items() if k.split(".")[0] not in derived}
    new = {k: v for k, v in _flatten(document["config"]).items() if k.split(".")[0] not in derived}
    diff = [
        f"{k}: saved {value(old, k)!r}, now {value(new, k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if diff:
        raise RunConfigMismatchError(
            f"{run_dir} already holds a run with different settings ({'; '.join(diff)}). "
            "Run with the same settings to resume it, or choose another --out folder."
        )


# -- checkpoints ---------------------------------------------------------------------------------------


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
