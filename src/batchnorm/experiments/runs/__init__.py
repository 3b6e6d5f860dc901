"""What every run shares, one concern per module: the run folder and its checkpoint
(:mod:`.folder`), data order and seeds (:mod:`.order`), data-parallel ranks (:mod:`.ranks`),
metrics, TensorBoard and progress (:mod:`.logs`), runs in parallel processes (:mod:`.parallel`),
and the errors (:mod:`.errors`). The files themselves are :mod:`batchnorm.runfiles`.
"""

from .errors import CheckpointError, RunConfigMismatchError, RunError
from .folder import load_checkpoint, open_run, save_checkpoint, start_session, versions
from .logs import log_scalars, progress_bar, tensorboard, tensorboard_available, write_metrics
from .order import DataOrder, Shuffle, derive_seed
from .parallel import run_parallel
from .ranks import Ranks

__all__ = [
    "CheckpointError",
    "DataOrder",
    "Ranks",
    "RunConfigMismatchError",
    "RunError",
    "Shuffle",
    "derive_seed",
    "load_checkpoint",
    "log_scalars",
    "open_run",
    "progress_bar",
    "run_parallel",
    "save_checkpoint",
    "start_session",
    "tensorboard",
    "tensorboard_available",
    "versions",
    "write_metrics",
]
