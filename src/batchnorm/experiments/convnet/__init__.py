"""Figures 2 and 3 of the paper (Sec. 4.2): accelerating BN networks, at CPU scale.

The paper trains an Inception network on ImageNet with and without BN, and shows that BN *plus a
few changes to the training recipe* (Sec. 4.2.1) reaches the baseline's best accuracy in 14× fewer
steps, trains at 30× the learning rate, and trains with sigmoids where the baseline stays at chance.
This module runs the same study with the same structure at a size a 2-core CPU can afford:

- **Data**: Fashion-MNIST by default (MNIST and CIFAR-10 as options), inputs scaled to [0, 1] and
  standardized per channel with the training set's mean and std.
- **Network** (:func:`build_network`): a small Inception network in the spirit of the paper's
  variant: a stem (3×3 conv, max pool, LRN, 1×1 and 3×3 convs, LRN, max pool), four Inception
  modules (:class:`Inception`: 1×1, 3×3 and double-3×3 branches — the 5×5 factorized into two
  3×3, Sec. 4.2 — and a pooling branch; one module reduces the resolution with stride 2 and a
  pass-through max pool, as the paper's modules 3c and 4e do), global average pooling, Dropout,
  and one fully connected layer, the classifier. BN networks get our
  :class:`~batchnorm.nn.BatchNorm2d` before every nonlinearity by
  :func:`batchnorm.tools.add_batchnorm` (Alg. 2 lines 1–2; the conv biases are dropped, Sec. 3.2),
  so a BN network and its baseline start from the *same* convolution weights.
- **Training**: SGD with momentum, mini-batches of 32, the learning rate decayed exponentially,
  L2 weight decay, Dropout before the classifier, LRN in the stem, random translations and
  photometric distortions (brightness, contrast) of the training images: the :class:`Recipe`.
- **Networks** (:data:`NETWORKS`), as in the paper: Baseline, BN-Baseline (BN, same recipe), BN-x5
  and BN-x30 (BN and :func:`accelerate`: the seven changes of Sec. 4.2.1 with the learning rate
  ×5 and ×30), BN-x5-Sigmoid; and the paper's two failures as controls: Baseline-x5 (the
  baseline's recipe at 5× its learning rate: "the same learning rate increase with original
  Inception caused the model parameters to reach machine infinity") and Baseline-Sigmoid. Not in
  the paper, run only when named: the ablation ``bn-x5-slow-decay``, BN-x5 with the Baseline's
  learning-rate decay.
- **Evaluation** and **divergence**: :mod:`.task`.

Each network is one run (:mod:`batchnorm.experiments.loop`); the modules: :mod:`.recipe` (the
recipe and Sec. 4.2.1's changes, the networks), :mod:`.config`, :mod:`.data`, :mod:`.model`,
:mod:`.task` (training step, evaluation, divergence).
"""

from ..study import Experiment
from .config import QUICK, ConvnetConfig, check_fits
from .data import ConvnetData, make_batch, prepare_data
from .model import MODULES, Inception, LocalResponseNorm, build_network
from .protocol import STUDY_BASE, protocol
from .recipe import (
    DECAY_SPEEDUP,
    L2_DIVISOR,
    MAIN,
    NETWORKS,
    PHOTOMETRIC_FACTOR,
    STUDY,
    Network,
    Recipe,
    accelerate,
)
from .task import ConvnetTask, evaluation_steps, population_steps, run_name

__all__ = [
    "DECAY_SPEEDUP",
    "EXPERIMENT",
    "L2_DIVISOR",
    "MAIN",
    "MODULES",
    "NETWORKS",
    "PHOTOMETRIC_FACTOR",
    "QUICK",
    "STUDY",
    "ConvnetConfig",
    "ConvnetData",
    "ConvnetTask",
    "Inception",
    "LocalResponseNorm",
    "Network",
    "Recipe",
    "accelerate",
    "build_network",
    "check_fits",
    "evaluation_steps",
    "make_batch",
    "population_steps",
    "prepare_data",
    "protocol",
    "run_name",
]

EXPERIMENT = Experiment(
    name="convnet",
    summary="Figures 2-3: accelerating BN networks, a small Inception on Fashion-MNIST",
    description=(
        "Reproduce Sec. 4.2 of the paper (Figures 2 and 3) at CPU scale: a small Inception "
        "network on Fashion-MNIST trained as Baseline, BN-Baseline, BN-x5, BN-x30, "
        "BN-x5-Sigmoid, and the controls Baseline-x5 and Baseline-Sigmoid; each network's "
        "steps to reach the Baseline's best test accuracy (and, when named, our ablation "
        "bn-x5-slow-decay: BN-x5 with the Baseline's learning-rate decay). One folder per "
        "network and seed (config.json, env.json, metrics.jsonl/.csv, checkpoint, TensorBoard "
        "events) and report.md with figure2.png in --out. Interrupted runs resume from their "
        "last checkpoint when the same command is run again. Lists (--seeds 0,1,2, --base-lr "
        "0.01,0.02) run every combination."
    ),
    config=ConvnetConfig,
    networks={
        name: {"label": n.label, "bn": n.bn, "activation": n.activation, "ablation": n.ablation}
        for name, n in NETWORKS.items()
    },
    task=ConvnetTask,
    prepare=lambda dataset, cfg: prepare_data(dataset, cfg.validation),
    data_key=lambda cfg: (cfg.dataset, cfg.validation),
    run_name=run_name,
    check_fits=check_fits,
    presets={"quick": QUICK},
    derived=("recipe",),
    network_groups={"all": STUDY, "main": MAIN},
    protocol=protocol,
    study_base=STUDY_BASE,
)
