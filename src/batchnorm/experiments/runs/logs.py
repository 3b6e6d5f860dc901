"""What a run reports as it goes: the metrics files, TensorBoard events, a progress bar."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path

from ... import runfiles
from ..._atomic import write_text

__all__ = ["log_scalars", "progress_bar", "tensorboard", "tensorboard_available", "write_metrics"]


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    """``metrics.jsonl`` (every field) and ``metrics.csv`` (the scalar ones), atomically."""
    write_text(run_dir / runfiles.METRICS, "".join(json.dumps(r) + "\n" for r in records))
    scalar_keys = [k for k in records[0] if not isinstance(records[0][k], list)]
    for r in records[1:]:
        scalar_keys += [k for k in r if k not in scalar_keys and not isinstance(r[k], list)]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=scalar_keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    write_text(run_dir / runfiles.METRICS_CSV, out.getvalue())


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package is installed (``pip install 'batchnorm[tensorboard]'``)."""
    import importlib.util

    try:
        return importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):  # a broken install, or one blocked in sys.modules
        return False


def tensorboard(run_dir: Path, start_step: int):
    """A TensorBoard writer for ``run_dir/tb`` (a resumed run purges the events after its
    checkpoint), or ``None`` when TensorBoard is not installed."""
    if not tensorboard_available():
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)


def log_scalars(tb, record: Mapping, step: int) -> None:
    """Every numeric field of ``record`` (but ``step``) as a TensorBoard scalar, then flush."""
    if tb is None:
        return
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
