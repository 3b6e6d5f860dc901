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
