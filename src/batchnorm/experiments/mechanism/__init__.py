"""Why does BN work? The paper's explanation (reduced internal covariate shift, Sec. 1–2) against
Santurkar et al. 2018 on the MNIST MLP family, with the instruments of
:mod:`batchnorm.tools.instruments` reading during training (issue 20, part 1).

The runs are Figure 1's (:mod:`..mnist`: binarized MNIST, plain SGD, batch 60, the same initial
weights and batches for every network of a seed), with deeper networks, noisy BN
(:class:`~batchnorm.nn.NoisyBatchNorm1d`) as a third network, and at every ``instrument_every``
steps Santurkar's ICS, the smoothness along the step and the distributions of every hidden
sigmoid's input (:mod:`.task`). The study and its verdict rules: :mod:`.protocol`.
"""

from ..mnist import check_fits, prepare_data
from ..study import Experiment
from .config import NETWORKS, MechanismConfig
from .protocol import STUDY_BASE, protocol
from .task import SHIFT, MechanismTask, run_name

__all__ = ["EXPERIMENT", "NETWORKS", "SHIFT", "MechanismConfig", "MechanismTask", "run_name"]

EXPERIMENT = Experiment(
    name="mechanism",
    summary="why BN works: internal covariate shift (the paper) against Santurkar et al. 2018",
    description=(
        "The pre-registered study of issue 20, part 1: the Figure 1 MLP and a 10-layer sigmoid "
        "MLP on binarized MNIST, without BN, with BN and with noisy BN at two strengths, 3 seeds "
        "of 10,000 steps, with Santurkar et al.'s ICS, the smoothness along the step and the "
        "drift of every hidden layer's inputs measured during training. One folder per run "
        "(config.json, env.json, metrics.jsonl/.csv, shift.json, checkpoint, TensorBoard "
        "events) and report.md in --out. Interrupted runs resume when the same command is run "
        "again."
    ),
    config=MechanismConfig,
    networks={name: {"label": label, "bn": bn} for name, (label, bn) in NETWORKS.items()},
    task=MechanismTask,
    prepare=lambda dataset, cfg: prepare_data(dataset, cfg.binarize_threshold, cfg.validation),
    data_key=lambda cfg: (cfg.dataset, cfg.binarize_threshold, cfg.validation),
    run_name=run_name,
    check_fits=check_fits,
    presets={"quick": {("steps",): 1500, ("eval_every",): 100, ("instrument_every",): 100}},
    network_groups={"all": tuple(NETWORKS)},
    protocol=protocol,
    study_base=STUDY_BASE,
)
