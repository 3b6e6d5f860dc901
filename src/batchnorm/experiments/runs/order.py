"""Randomness and data order: every random choice of a run is a pure function of its seed.

:class:`DataOrder` makes the *global* mini-batch of every step a pure function of ``(seed, step)``,
and :func:`derive_seed` gives independent seeds for every other random choice, so a resumed run
repeats exactly what an uninterrupted one does, and a data-parallel run can take its rank's slice
of the same global batch.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from torch import Tensor

__all__ = ["DataOrder", "Shuffle", "derive_seed"]


def derive_seed(seed: int, *parts: object) -> int:
    """An independent 63-bit seed for each (seed, purpose, index), stable across Python versions."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


Shuffle = Literal["examples", "batches"]


class DataOrder:
    """The training batches, a pure function of ``(seed, step)``.

    ``indices(step)`` is the *global* mini-batch of a step: a data-parallel run gives each rank a
    slice of it, so the examples seen per step do not depend on the number of processes. The last
    partial batch of an epoch is dropped (``steps_per_epoch = n // batch_size``).

    ``shuffle`` says how thoroughly:

    - ``"examples"``: a fresh permutation of all examples every epoch, so the mini-batches change
      composition from epoch to epoch.
    - ``"batches"``: the examples are cut into mini-batches once (one permutation per seed), and
      each epoch only reorders these fixed batches: the same examples always meet in a batch.
      This is what "shuffle training examples more thoroughly" (arXiv:1502.03167 Sec. 4.2.1,
      "which prevents the same examples from always appearing in a mini-batch together")
      improves on; it matters for BN, whose output for an example depends on its batch mates.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, *, shuffle: Shuffle = "examples"
    ) -> None:
        if shuffle not in ("examples", "batches"):
            raise ValueError(f"shuffle must be 'examples' or 'batches', got {shuffle!r}")
        if not 0 < batch_size <= n:
            raise ValueError(
                f"batch_size must be in 1..{n} (the number of examples), got {batch_size}"
            )
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.steps_per_epoch = n // batch_size
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)
        if shuffle == "batches":
            gen = torch.Generator().manual_seed(derive_seed(seed, "batches"))
            self._fixed = torch.randperm(n, generator=gen)[: self.steps_per_epoch * batch_size]
            self._fixed = self._fixed.view(self.steps_per_epoch, batch_size)

    def indices(self, step: int) -> Tensor:
        """Indices of the global batch used by training step ``step`` (1-based)."""
        if step < 1:
            raise ValueError(f"steps count from 1, got {step}")
        epoch, pos = divmod(step - 1, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
            size = self.n if self.shuffle == "examples" else self.steps_per_epoch
            self._perm, self._epoch = torch.randperm(size, generator=gen), epoch
        if self.shuffle == "batches":
            return self._fixed[self._perm[pos]]
        return self._perm[pos * self.batch_size : (pos + 1) * self.batch_size]
