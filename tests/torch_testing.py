"""PyTorch's own test infrastructure (``torch.testing._internal``), imported without its side
effects on the rest of our suite.

Importing ``common_utils`` (which ``common_modules`` and ``common_methods_invocations`` do)
loads a global hypothesis profile (``dev``: 10 examples, or ``pytorch_ci``: 50, where CI is set)
and freezes ``torch.backends`` flags (``disable_global_flags``). Both would change tests that
have nothing to do with these: the previous hypothesis profile and the flag are restored here,
right after the import. Use these names rather than importing ``torch.testing._internal``
directly.
"""

from __future__ import annotations

import hypothesis
import torch
import torch.backends

_profile = hypothesis.settings._current_profile
# (the flag lives in the globals of torch/backends/__init__.py, not in the module object that
# `torch.backends` is replaced by)
_backends_globals = torch.backends.flags_frozen.__globals__
_flag = _backends_globals["__allow_nonbracketed_mutation_flag"]
try:
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
finally:
    hypothesis.settings.load_profile(_profile or "default")
    _backends_globals["__allow_nonbracketed_mutation_flag"] = _flag

__all__ = ["BATCH_NORM_MODULES", "BATCH_NORM_OP", "ModuleErrorEnum"]

# The ModuleInfos of torch.nn.BatchNorm1d/2d/3d and the OpInfo of nn.functional.batch_norm (the
# variant without a name; "without_cudnn" runs on CUDA only and has the same samples).
BATCH_NORM_MODULES = [
    m
    for m in module_db
    if m.module_cls in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
]
BATCH_NORM_OP = next(
    op for op in op_db if op.name == "nn.functional.batch_norm" and not op.variant_test_name
)
