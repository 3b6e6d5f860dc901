"""Drop-in Batch Normalization layers: ``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``.

Ioffe & Szegedy, arXiv:1502.03167. In training each channel is normalized with the statistics of
the mini-batch (Alg. 1; over N·L, N·H·W or N·D·H·W values for convolutional inputs, Sec. 3.2) and
the layer keeps population statistics for inference (Alg. 2), where BN is one fixed affine map per
channel (Alg. 2 line 11).

The classes subclass ``torch.nn.BatchNorm1d/2d/3d``: the same constructor arguments and defaults,
the same parameters and buffers (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), so ``state_dict``s load both ways with ``strict=True``, and
``isinstance(layer, torch.nn.BatchNorm2d)`` holds, so tools written for torch's layers
(``torch.ao`` fusion, ``swa_utils.update_bn``, ``convert_sync_batchnorm``) accept them.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional.backend import fused_eager
from ..functional.core import (
    _train,
    check_hyperparameters,
    check_input,
    check_momentum,
    fused_entry,
    nonfinite_message,
    update_running_stats,
    warn_skip,
)
from ..functional.masked import check_mask, masked_batch_norm_train
from ..functional.stats import PopulationStats

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "StatsMode"]

StatsMode = Literal["ema", "cumulative", "population"]
_STATS_MODES = ("ema", "cumulative", "population")


class _BatchNormMixin:
    """What our layers add to ``torch.nn.BatchNorm*``; documented once, here.

    Args (beyond torch's, keyword-only):
        stats_mode: how training steps update ``running_mean``/``running_var`` (the population
            statistics used by ``eval()``):

            - ``"ema"`` (default when ``momentum`` is a number): exponential moving average,
              ``new = (1 − momentum) · old + momentum · batch``. What every framework does; it
              follows the weights as they train, so it is the right choice for evaluating *during*
              training, but it lags behind and mixes statistics of older weights.
            - ``"cumulative"`` (default when ``momentum=None``; torch's ``momentum=None``): the equal-
              weight average of every batch's statistics since the last reset. Better than an EMA
              when the weights no longer change (e.g. after training), worse while they do.
            - ``"population"``: the paper's estimate (Alg. 2 lines 9–10) over every training batch
              since the last :meth:`reset_running_stats`: ``E[x] = E_B[μ_B]``, ``Var[x] =
              m/(m−1) · E_B[σ²_B]``, accumulated in float64, so that ``eval()`` after an explicit
              pass over training batches with frozen weights uses exactly the paper's statistics.
              Use it for that pass (``batchnorm.tools.recalibrate`` runs one for you, on any BN
              layer); it is not meant for the training run itself.

            The variance fed to every running average is the unbiased one (m/(m−1)·σ²_B), while the
            training forward normalizes with the biased σ²_B (Alg. 1), as torch does.
        guard_nonfinite: if a training batch's statistics are not finite (a NaN/inf input, an fp16
            overflow upstream), do not write them into the running statistics: skip the update,
            count it in ``nonfinite_skips`` and warn the first time (on CPU; on other devices
            reading the counter would synchronize every step, so check it yourself, e.g. with
            :func:`batchnorm.tools.nonfinite_skips`).

    The layers hold exactly torch's parameters and buffers (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``, or ``None`` where torch has ``None``), so
    ``state_dict``, ``.buffers()``, DDP's buffer broadcast and tools that move or count buffers see
    torch's layer. Hence, ``eps`` and ``momentum`` follow torch's rules too: ``eps = 0`` is accepted
    (and raises in a training forward, as torch's does); only ``eps = NaN`` and a ``momentum``
    outside [0, 1] raise already here (see docs/differences.md).

    Attributes:
        nonfinite_skips: the guard's counter, a 0-dim int64 tensor that is deliberately *not* a
            buffer (a buffer torch's layer lacks would change ``.buffers()``, and DDP broadcasts
            every buffer at each forward). It follows the layer across devices (``.to()``,
            ``.cuda()``, ``to_empty()``; never to ``meta``, where it could not count) and to the
            device of the input it counts; it is not saved in the ``state_dict`` and is reset by
            ``reset_running_stats()``.
        freeze_stats: when True, training-mode forwards normalize with the running statistics and
            leave them untouched, while γ/β (and the input) still receive gradients — for
            fine-tuning, where ``model.train()`` would otherwise re-enable statistic updates. It
            survives ``model.train()``; ``eval()`` is unaffected.
    """

    _ndims: tuple[int, ...] = ()
    _shape_doc = ""
    # declared for type checkers; nn.BatchNorm* sets these
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    training: bool
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        stats_mode: StatsMode | None = None,
        guard_nonfinite: bool = True,
    ) -> None:
        where = f"{type(self).__name__}({num_features})"
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"{where}: num_features must be a positive int, got {num_features!r}")
        if eps != eps:  # NaN: torch would accept it and return NaN everywhere
            raise ValueError(f"{where}: eps must be a number, got {eps}")
        check_momentum(momentum, where)
        super().__init__(  # type: ignore[call-arg]
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.guard_nonfinite = guard_nonfinite
        self.freeze_stats = False
        self.layer_name = ""
        self._population_mode = False
        self._population = PopulationStats()
        # Set by batchnorm.tools.accumulate_statistics: micro-batch statistics gathered here and
        # applied to the running buffers in one update (gradient accumulation).
        self._deferred: PopulationStats | None = None
        # A plain attribute, not a buffer (see the class docstring); never on meta (not under a
        # `with torch.device("meta"):` block either: hence the explicit CPU default).
        home = torch.device(device) if device is not None else torch.device("cpu")
        self.nonfinite_skips = torch.zeros(
            (), dtype=torch.long, device=home if home.type != "meta" else "cpu"
        )
        if stats_mode is not None:
            self.stats_mode = stats_mode

    # -- population statistics mode -------------------------------------------------------------

    @property
    def stats_mode(self) -> StatsMode:
        """``"population"``, or else ``"cumulative"`` if ``momentum is None``, else ``"ema"``."""
        if self._population_mode:
            return "population"
        return "cumulative" if self.momentum is None else "ema"

    @stats_mode.setter
    def stats_mode(self, mode: StatsMode) -> None:
        if mode not in _STATS_MODES:
            raise ValueError(
                f"{self._where()}: stats_mode must be one of {_STATS_MODES}, got {mode!r}"
            )
        if mode == "ema" and self.momentum is None:
            raise ValueError(
                f"{self._where()}: stats_mode='ema' needs a momentum in [0, 1], but momentum=None"
            )
        if mode == "cumulative":
            self.momentum = None
        if mode == "population" and self._population_mode is False:
            self._population.reset()
        self._population_mode = mode == "population"

    @property
    def population(self) -> PopulationStats:
        """The float64 accumulator behind ``stats_mode="population"`` (batches since the last reset)."""
        return self._population

    def reset_running_stats(self) -> None:
        super().reset_running_stats()  # type: ignore[misc]
        if hasattr(self, "_population"):  # torch's __init__ calls this before ours has run
            self._population.reset()
            self.nonfinite_skips.zero_()

    # -- the non-finite counter: a plain tensor attribute that follows the layer ------------------

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # type: ignore[misc]
        counter = self.__dict__.get("nonfinite_skips")
        if isinstance(counter, Tensor):
            # Only the device is taken from fn (the value is kept: to_empty() would make it
            # garbage, and .type(float) a float); a move to meta leaves it where it was.
            target = fn(counter).device
            if target != counter.device and target.type != "meta":
                self.nonfinite_skips = counter.to(target)
        return self

    def _counter(self, like: Tensor) -> Tensor:
        """``nonfinite_skips``, moved first to ``like``'s device if it is elsewhere (parameters
        and buffers loaded onto another device, e.g. by ``load_state_dict(assign=True)``)."""
        counter = self.nonfinite_skips
        if counter.device != like.device and like.device.type != "meta":
            if counter.is_meta:  # (only a counter pickled on meta could be): it counted nothing
                counter = torch.zeros((), dtype=torch.long)
            counter = self.nonfinite_skips = counter.to(like.device)
        return counter

    def __setstate__(self, state: dict) -> None:
        # Layers pickled before the counter left the buffers (torch.save(model) of older versions).
        buffers = state.get("_buffers", {})
        if "nonfinite_skips" in buffers:
            state["nonfinite_skips"] = buffers.pop("nonfinite_skips")
        super().__setstate__(state)  # type: ignore[misc]

    # -- forward -------------------------------------------------------------------------------

    def _where(self) -> str:
        name = f" '{self.layer_name}'" if getattr(self, "layer_name", "") else ""
        return f"{type(self).__name__}({self.num_features}){name}"

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._ndims:
            raise ValueError(
                f"{self._where()}: expected a {' or '.join(f'{d}-D' for d in self._ndims)} input "
                f"{self._shape_doc}, got shape {tuple(input.shape)} ({input.dim()}-D)"
            )

    def _check(self, input: Tensor, batch_stats: bool) -> None:
        """Every check of the forward, as cheap comparisons; the messages come from the slow path.

        ``eps`` and ``momentum`` as torch: eps > 0 with batch statistics, eps >= 0 otherwise;
        momentum in [0, 1] when this call updates the running statistics."""
        if not isinstance(input, Tensor):
            raise TypeError(f"{self._where()}: expected a Tensor, got {type(input).__name__}")
        shape = input.shape
        if (
            len(shape) not in self._ndims
            or shape[1] != self.num_features
            or not input.is_floating_point()
            or (batch_stats and input.numel() <= shape[1])
        ):
            self._check_input_dim(input)
            check_input(input, self.num_features, batch_stats, self._where())
        updates = batch_stats and self.training and self.track_running_stats
        if not self.eps > 0 or (
            updates and self.momentum is not None and not 0 <= self.momentum <= 1
        ):
            check_hyperparameters(
                self.eps, self.momentum if updates else None, self._where(), training=batch_stats
            )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input``; with ``mask`` (bool, the input's shape without the channel
        dimension, True = valid), training statistics ignore the masked positions (padding)."""
        # Parameters and buffers straight from their dicts: nn.Module.__getattr__ costs ~0.3 µs a
        # lookup, a sizeable share of a small layer's step. A parametrized weight (or a buffer
        # replaced by a plain attribute) is not in the dict: then the attribute is used (not
        # dict.get(key, self.attr), which would pay for the attribute every time).
        params, buffers = self._parameters, self._buffers
        weight = params["weight"] if "weight" in params else self.weight  # noqa: SIM401
        bias = params["bias"] if "bias" in params else self.bias  # noqa: SIM401
        mean = buffers["running_mean"] if "running_mean" in buffers else self.running_mean  # noqa: SIM401
        var = buffers["running_var"] if "running_var" in buffers else self.running_var  # noqa: SIM401
        # The common case, a training step with running statistics on the fused kernels, in this
        # one frame and one C++ call: at the MNIST MLP's size BN costs per call, and in a full
        # training step (cold caches) each Python frame or handful of attribute reads on this path
        # measured about 1 µs per layer. So the kernels check the input and the settings (before
        # writing anything), and only a refused call runs the Python checks, for the error that
        # names the layer.
        if (
            mask is None
            and type(input) is Tensor
            and self.training
            and not self.freeze_stats
            and self.track_running_stats
            and mean is not None
            and not self._population_mode
            and self._deferred is None
            and input.dim() in self._ndims
            and fused_eager(input)
        ):
            skips = self.nonfinite_skips
            try:
                y, _, _, skipped = fused_entry()(
                    input,
                    weight,
                    bias,
                    mean,
                    var,
                    buffers["num_batches_tracked"],
                    skips,
                    self.momentum,
                    self.eps,
                    self.guard_nonfinite,
                )
            except RuntimeError:
                self._check(input, True)
                raise
            if y is not None:
                if skipped:
                    warn_skip(skips, self._where)
                return y
            # Refused without running (a tensor subclass among the parameters or buffers, or one
            # on another device than the input, e.g. meta): the general path below decides.
        if mask is not None:
            return self._masked_forward(input, mask)
        batch_stats = (self.training and not self.freeze_stats) or mean is None
        if isinstance(input, torch.fx.Proxy):
            # torch.fx (FX quantization and fusion, our tools) traces into non-torch modules:
            # record the equivalent F.batch_norm call (torch's update rule, no guard).
            update = batch_stats and self.training and self.track_running_stats
            return F.batch_norm(
                input,
                mean if update or not batch_stats else None,
                var if update or not batch_stats else None,
                weight,
                bias,
                batch_stats,
                self.momentum if self.momentum is not None else 0.0,
                self.eps,
            )
        self._check(input, batch_stats)
        if not batch_stats:
            # Alg. 2 line 11 (eval, or frozen statistics): one affine map per channel.
            return F.batch_norm(input, mean, var, weight, bias, False, 0.0, self.eps)
        if not (self.training and self.track_running_stats and mean is not None):
            return _train(
                input,
                weight,
                bias,
                None,
                None,
                None,
                self.momentum,
                self.eps,
                False,
                None,
                self._where,
            ).output
        if self._population_mode or getattr(self, "_deferred", None) is not None:
            return self._population_step(input)
        return _train(
            input,
            weight,
            bias,
            mean,
            var,
            buffers["num_batches_tracked"],
            self.momentum,
            self.eps,
            self.guard_nonfinite,
            self._counter(input),
            self._where,
        ).output

    def _masked_forward(self, input: Tensor, mask: Tensor) -> Tensor:
        batch_stats = (self.training and not self.freeze_stats) or self.running_mean is None
        self._check(input, False)
        if not batch_stats:  # inference: one affine map per channel, the mask changes nothing
            check_mask(input, mask, self._where())
            return F.batch_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
            )
        y, mean, var, m = masked_batch_norm_train(
            input, mask, self.weight, self.bias, self.eps, self._where()
        )
        if self.training and self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean, var, m)
        return y

    def _population_step(self, input: Tensor) -> Tensor:
        """A training step whose running-statistics update happens in Python (population mode,
        deferred updates): the kernel normalizes and returns the batch statistics."""
        y, mean, var = _train(
            input, self.weight, self.bias, None, None, None, None, self.eps, False, None, ""
        )
        self._update_running_stats(mean, var, input.numel() // input.shape[1])
        return y

    def _finite_or_skip(self, mean: Tensor, var: Tensor) -> bool:
        """The non-finite guard for updates made in Python: False (counted, and warned about the
        first time) when the guard is on and the statistics are not finite."""
        if not self.guard_nonfinite or bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
            return True
        counter = self._counter(mean)
        if int(counter) == 0:
            warnings.warn(nonfinite_message(self._where()), UserWarning, stacklevel=5)
        counter.add_(1)
        return False

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        """Update the running buffers from statistics computed outside the fused kernel (merged
        across processes, population mode, deferred micro-batches) with the layer's rule and
        guard; ``var`` is the biased variance over ``count`` values per channel."""
        if count == 0:  # an empty batch: no statistics
            return
        if getattr(self, "_deferred", None) is not None:  # accumulate_statistics is active
            if self._finite_or_skip(mean, var):
                self._deferred.update(mean, var, count)
            return
        if self._population_mode:  # Alg. 2 lines 9-10, float64
            if self._finite_or_skip(mean, var):
                self._population.update(mean, var, count)
                est_mean, est_var = self._population.paper()
                self.running_mean.copy_(est_mean)
                self.running_var.copy_(est_var)
                self.num_batches_tracked.add_(1)
            return
        # Read a CPU counter only: reading a CUDA one would synchronize every step.
        counter = self._counter(mean)
        before = int(counter) if self.guard_nonfinite and mean.is_cpu else None
        update_running_stats(
            mean,
            var,
            count,
            self.running_mean,
            self.running_var,
            self.num_batches_tracked,
            counter,
            self.momentum,
            self.guard_nonfinite,
        )
        if before == 0 and int(counter) > 0:
            warnings.warn(nonfinite_message(self._where()), UserWarning, stacklevel=4)

    def extra_repr(self) -> str:
        extra = super().extra_repr()  # type: ignore[misc]
        if self._population_mode:
            extra += ", stats_mode=population"
        if not self.guard_nonfinite:
            extra += ", guard_nonfinite=False"
        if self.freeze_stats:
            extra += ", freeze_stats=True"
        return extra


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """BN over a 2-D ``(N, C)`` input (per activation) or 3-D ``(N, C, L)`` input (per channel, over
    N·L values). Drop-in for :class:`torch.nn.BatchNorm1d`; see :class:`_BatchNormMixin`."""

    _ndims = (2, 3)
    _shape_doc = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """BN over a 4-D ``(N, C, H, W)`` input, per feature map over N·H·W values (Sec. 3.2).
    Drop-in for :class:`torch.nn.BatchNorm2d`; see :class:`_BatchNormMixin`."""

    _ndims = (4,)
    _shape_doc = "(N, C, H, W)"


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """BN over a 5-D ``(N, C, D, H, W)`` input, per feature map over N·D·H·W values.
    Drop-in for :class:`torch.nn.BatchNorm3d`; see :class:`_BatchNormMixin`."""

    _ndims = (5,)
    _shape_doc = "(N, C, D, H, W)"
