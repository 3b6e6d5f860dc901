"""Figure 1 of the paper (Sec. 4.1): an MLP on MNIST with and without BN, and its activations over time.

The experiment (arXiv:1502.03167, Sec. 4.1), and the choices the paper leaves open:

- Input: the 28×28 image binarized as ``pixel >= 128`` (of 0..255) → 1.0, else 0.0; 784 values.
  # DEVIATION: the paper says "binary" but not how; a fixed threshold at half intensity is the
  # simplest deterministic reading (stochastic binarization would add noise the paper doesn't mention).
- Network (:func:`build_mlp`): 784 → 100 → 100 → 100 → 10, sigmoid hidden units, softmax +
  cross-entropy. Every weight (and the output layer's) ~ N(0, ``init_std``²), biases 0. The BN
  network (``network="bn"``) puts our :class:`~batchnorm.nn.BatchNorm1d` on each hidden layer's
  ``Wu`` before the sigmoid and drops the hidden biases (Sec. 3.2: the mean subtraction cancels
  them, β takes their role). Both networks of a seed start from the *same* weight matrices.
- Training: plain SGD (no momentum, no weight decay), mini-batches of 60, 50,000 steps. The data
  order is a pure function of ``(seed, step)``, so both networks of a seed see the same batches:
  a fresh permutation of the training images per epoch.
- Evaluation and Figure 1(b, c): :mod:`.task`.

Each network is its own run (:mod:`batchnorm.experiments.loop`); a report pairs the two networks
of a seed. Data-parallel (``torchrun --nproc-per-node N``, :class:`~..runs.Ranks`): every step's
global batch of 60 is split into contiguous slices, one per process, the network is wrapped in
``DistributedDataParallel``, and BN statistics are synchronized over the processes (``bn_sync``,
the default: the same normalization as one process) or per process. Only rank 0 evaluates and
writes.
"""

from ..study import Experiment
from .config import DATASETS, NETWORKS, MnistConfig, check_fits
from .data import MnistData, prepare_data
from .model import build_mlp, sigmoid_input
from .protocol import protocol
from .task import QUANTILES, SENSITIVITY_BATCHES, MnistTask, run_name

__all__ = [
    "DATASETS",
    "EXPERIMENT",
    "NETWORKS",
    "QUANTILES",
    "SENSITIVITY_BATCHES",
    "MnistConfig",
    "MnistData",
    "MnistTask",
    "build_mlp",
    "check_fits",
    "prepare_data",
    "protocol",
    "run_name",
    "sigmoid_input",
]

EXPERIMENT = Experiment(
    name="mnist",
    summary="Figure 1: the MNIST MLP with and without BN (the main job)",
    description=(
        "Reproduce Figure 1 of the paper (Sec. 4.1): a 784-100-100-100-10 sigmoid MLP on "
        "binarized MNIST, trained with plain SGD with and without BN (our BatchNorm1d before "
        "every hidden sigmoid, hidden biases dropped), same initial weights and data order. One "
        "folder per network and setting (config.json, env.json, metrics.jsonl/.csv, checkpoint, "
        "TensorBoard events, figure1.png, report.md), and a summary report.md in --out. "
        "Interrupted runs resume from their last checkpoint when the same command is run again. "
        "Lists (--lr 0.1,0.5) run every combination."
    ),
    config=MnistConfig,
    networks={name: {"label": label, "bn": bn} for name, (label, bn) in NETWORKS.items()},
    task=MnistTask,
    prepare=lambda dataset, cfg: prepare_data(dataset, cfg.binarize_threshold, cfg.validation),
    data_key=lambda cfg: (cfg.dataset, cfg.binarize_threshold, cfg.validation),
    run_name=run_name,
    check_fits=check_fits,
    presets={"quick": {("steps",): 2000, ("eval_every",): 100, ("layer_every",): 200}},
    network_groups={"all": tuple(NETWORKS)},
    protocol=protocol,
    study_base=MnistConfig(),
)
