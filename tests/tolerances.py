"""The one table of numerical tolerances used by the tests (see STYLE.md: tolerances live in one place).

Outputs of BN are O(1) by construction, so absolute and relative tolerances are of the same order.
"""

import torch

# Comparing a path computed in `dtype` against the float64 reference evaluated on the same values.
TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-9},
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}

# Comparing our float32 layers with torch's float32 layers (two float32 computations).
TORCH_AGREEMENT = {"atol": 2e-5, "rtol": 2e-5}

# Statistics returned in float64 from float32 inputs, against float64 statistics of the same values.
STATS_RTOL_F32 = 1e-5

# Gradients (float32 path vs float64 reference): sums over m values lose a little more.
GRAD_F32 = {"atol": 1e-4, "rtol": 1e-4}

# float64 inputs 1e6 + N(0, 1): each holds only ~10 significant digits of its deviation from the
# mean (ulp(1e6) ≈ 1.2e-10), so even exact algorithms agree to ~1e-9, not 1e-10. A variance
# formed as E[x²] − E[x]² would be off by ~1e-4 here, so this still tells stable from unstable.
F64_OFFSET_1E6 = {"atol": 1e-8, "rtol": 1e-6}

# Folding BN into a layer (Alg. 2 line 11), computed in float64: folded float64 layer vs
# BN(layer(x)) in float64. A wrong fold is off by O(1).
FOLD_F64 = {"atol": 1e-10, "rtol": 1e-10}

# A folded float32 model vs the float32 original on the same input, as max |diff| / max |output|
# (only the rounding of the folded weights and of the reordered sums differs).
FOLD_F32_REL = 2e-6

# onnxruntime (float32) running an exported model vs torch running the same model.
ONNX_F32 = {"atol": 1e-5, "rtol": 1e-4}

# Population statistics of a float32 model's O(1) activations (accumulated in float64) vs a float64
# oracle over the same float32 activations. Deeper layers' inputs pass through float32 BN kernels
# that differ in the last bits between backends, so a channel mean near 0 is off by ~1e-8 absolute.
RECAL_F32 = {"atol": 1e-6, "rtol": 1e-6}

# Population statistics of float64 data vs a hand/numpy-style float64 computation.
RECAL_F64 = {"atol": 1e-12, "rtol": 1e-10}

# Ours against torch's own implementation on the same inputs, in the inputs' dtype (the
# differential and fuzz tests). float64: both are exact to ~1e-15. float32: two float32 results
# whose rounding orders differ (outputs: TORCH_AGREEMENT; gradients sum over m values: GRAD_F32).
# 16-bit: both compute in float32 and round once to the 16-bit output, which may land one unit in
# the last place apart (2^-8 relative for bfloat16, 2^-11 for float16), so the float64-reference
# tolerances of TOL apply.
AGREEMENT = {
    torch.float64: TOL[torch.float64],
    torch.float32: TORCH_AGREEMENT,
    torch.float16: TOL[torch.float16],
    torch.bfloat16: TOL[torch.bfloat16],
}
GRAD_AGREEMENT = {
    torch.float64: TOL[torch.float64],
    torch.float32: GRAD_F32,
    torch.float16: TOL[torch.float16],
    torch.bfloat16: TOL[torch.bfloat16],
}

# The fuzz test's max-norm relative agreement, max|a - b| <= tol · (1 + max|b|), for outputs,
# gradients and running statistics, against torch and against float64 on the same rounded values
# (elementwise tolerances fail where BN's terms cancel to ~0 next to large ones). 16-bit: two
# roundings to the output dtype, each half a unit in the last place (2^-9 and 2^-12 relative).
FUZZ_REL = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}
