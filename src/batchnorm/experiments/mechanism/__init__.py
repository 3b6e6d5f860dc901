"""Why does BN work? The paper's explanation (reduced internal covariate shift, Sec. 1–2) against
Santurkar et al. 2018 on the MNIST MLP family, with the instruments of
:mod:`batchnorm.tools.instruments` reading during training, and the paper's other explanations
(Sec. 3.3 scale invariance and learning rates, Sec. 4.2.1 saturating nonlinearities, Sec. 3.4
regularization), the mini-batch size, and the scale of the weights as a learning rate (issue 20,
parts 1–6).

The runs are Figure 1's (:mod:`..mnist`: binarized MNIST, plain SGD, batch 60, the same initial
weights and batches for every network of a seed), with deeper networks, noisy BN
(:class:`~batchnorm.nn.NoisyBatchNorm1d`), ghost BN and Batch Renorm as further networks, and at
every ``instrument_every`` steps Santurkar's ICS, the smoothness along the step and the
distributions of every hidden sigmoid's input (:mod:`.task`). The study and its verdict rules:
:mod:`.protocol`.
"""

from ..mnist import check_fits, prepare_data
from ..study import Experiment
from .config import NETWORKS, MechanismConfig
from .protocol import STUDY_BASE, protocol
from .task import RENORM, SHIFT, MechanismTask, run_name

__all__ = ["EXPERIMENT", "NETWORKS", "SHIFT", "MechanismConfig", "MechanismTask", "run_name"]

EXPERIMENT = Experiment(
    name="mechanism",
    summary="why BN works: internal covariate shift (the paper) against Santurkar et al. 2018",
    description=(
        "The pre-registered study of issue 20. Part 1: the Figure 1 MLP and a 10-layer sigmoid "
        "MLP on binarized MNIST, without BN, with BN and with noisy BN at two strengths, with "
        "Santurkar et al.'s ICS, the smoothness along the step and the drift of every hidden "
        "layer's inputs measured during training. Part 2: learning rates 0.05-50 and Sec. 3.3's "
        "scale check. Parts 3-5: sigmoid MLPs of depth 3-20, Dropout 0-0.5, and BN's statistics "
        "from ghost batches of 2-16 and Batch Renorm. Part 6: the hidden weights scaled by 0.1 "
        "and 10 against lr / a² on them. 3 seeds (part 6: 5) of 10,000 steps each. One folder "
        "per run (config.json, env.json, metrics.jsonl/.csv, shift.json, checkpoint, "
        "TensorBoard events) and report.md in --out. Interrupted runs resume when the same "
        "command is run again."
    ),
    config=MechanismConfig,
    networks={
        name: {"label": label, "bn": bn, **({"renorm": RENORM} if name == "renorm" else {})}
        for name, (label, bn) in NETWORKS.items()
    },
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
