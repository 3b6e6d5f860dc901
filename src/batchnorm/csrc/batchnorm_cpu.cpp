// Fused CPU kernels for training-mode Batch Normalization (Ioffe & Szegedy, arXiv:1502.03167).
//
// BN is memory-bound: the training forward must read x and write y, the backward must read x and
// dy and write dx. These kernels read each tensor once from memory and re-read it while it is
// still in cache where the layout allows:
//
//   * "planar" inputs (contiguous N, C, *spatial with spatial size S > 1): one task per channel
//     computes the channel's statistics and then normalizes it while its N·S values sit in L2,
//     in the same loop as the next channel's statistics pass (planar_driver), so that reading
//     one channel from memory overlaps writing the other's output;
//   * "rows" inputs (2-D (N, C), and channels_last / channels_last_3d): the reduction runs over
//     rows with per-channel accumulators, then an elementwise pass applies the result.
// Large float32 and 16-bit outputs (y, dx) are written with streaming stores (see write_run).
//
// Numerics (see also functional/stats.py):
//   * every reduction is split into chunks (about 64K values) whose boundaries depend only on the
//     shape. A chunk's moments are sums of d = x - K and d² in one pass, K a shift taken from a
//     few of the chunk's values, redone around the chunk's mean (while it is in L1/L2) when K is
//     too far from it (planar: σ/2, rows: σ); chunks are merged with Chan et al.'s formula in
//     float64 in a fixed order: no E[x²] - E[x]² cancellation (inputs like 1e4 + N(0, 1) are
//     exact to float rounding), and results do not depend on the number of threads;
//   * inside a chunk, sums run in 64-byte vectors with several accumulators, each lane adding at
//     most 16 values in float before flushing into float64;
//   * x - mean is computed as x - mean_hi, mean_hi the float64 mean rounded to the compute type,
//     and the rest (mean - mean_hi) is folded into per-channel float64 constants: exact to float
//     rounding even when |mean| >> std;
//   * 16-bit inputs are computed in float32; batch statistics are returned in float64.
//
// Ops (schemas at the bottom): the fused `train_forward` (statistics, normalization and the
// running-statistics update with a non-finite guard, in one call; its autograd is C++, so a
// training step pays one dispatch per layer and no Python on the backward path) and
// `train_backward`; and the same work split in steps for callers that must combine statistics
// across processes (SyncBatchNorm) or only need them: `moments`, `normalize`, `backward_reduce`,
// `backward_elementwise`. Both families run the same reduction and elementwise loops below.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/extension.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace batchnorm {
namespace {

using at::Tensor;

// ----------------------------------------------------------------------------------------------
// Element loads and stores: every storage type is computed in float (double for double).

template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};

inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float load(at::Half v) {
#if defined(__F16C__)
  // The F16C instruction, explicitly: from _Float16, GCC folds a following conversion to double
  // into one half-to-double call into libgcc (no such instruction here), which made the shift
  // sample of a float16 chunk cost more than the whole float16 statistics pass (2026-11-30).
  return _cvtsh_ss(v.x);
#else
  _Float16 h;
  std::memcpy(&h, &v, 2);
  return static_cast<float>(h);
#endif
}
inline float load(at::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline void store(float* p, float v) { *p = v; }
inline void store(double* p, double v) { *p = v; }
inline void store(at::Half* p, float v) {
  _Float16 h = static_cast<_Float16>(v);
  std::memcpy(p, &h, 2);
}
inline void store(at::BFloat16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  // round to nearest even; keep NaN a (quiet) NaN
  uint32_t r = (v != v) ? 0x7FC00000u : u + 0x7FFFu + ((u >> 16) & 1u);
  p->x = static_cast<uint16_t>(r >> 16);
}

// ----------------------------------------------------------------------------------------------
// Shapes, chunking, threads.

enum class Layout { Planar, Rows };

struct Geometry {
  Layout layout;
  int64_t N, C, S;  // planar: x[n][c][s]; rows: x[r][c] with N * S rows
  int64_t m;        // values per channel, N * S
  int64_t rows() const { return N * S; }
  int64_t total() const { return m * C; }
};

// Returns the geometry and the tensor to read (x itself unless it had to be made contiguous).
std::pair<Geometry, Tensor> geometry_of(const Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "batchnorm: expected an input of shape (N, C, ...), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "batchnorm: the fused kernels take CPU tensors, got ",
              x.device());
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = C == 0 || N == 0 ? 0 : x.numel() / (N * C);
  // The standard layout first: with one channel (or 1x1 maps) a tensor is contiguous in both
  // formats, and one channel read as rows of one value would run the scalar loop (2.4x slower
  // than native on 64x1x224x224).
  if (x.is_contiguous()) return {{S == 1 ? Layout::Rows : Layout::Planar, N, C, S, N * S}, x};
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast))
    return {{Layout::Rows, N, C, S, N * S}, x};
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return {{Layout::Rows, N, C, S, N * S}, x};
  Tensor xc = x.contiguous();
  return {{S == 1 ? Layout::Rows : Layout::Planar, N, C, S, N * S}, xc};
}

// `t` in the layout and dtype of the input geometry `g` (no copy when it already is).
Tensor like_input(const Tensor& t, const Tensor& x, const Geometry& g) {
  TORCH_CHECK(t.sizes() == x.sizes(), "batchnorm: a gradient of shape ", t.sizes(),
              " does not match the input's shape ", x.sizes());
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
  if (g.layout == Layout::Rows && g.S > 1)
    fmt = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  Tensor out = t.scalar_type() == x.scalar_type() ? t : t.to(x.scalar_type());
  return out.is_contiguous(fmt) ? out : out.contiguous(fmt);
}

// Chunks hold about this many values (256 KB of float32: in L2 for a chunk's second pass);
// chunk boundaries depend only on the shape.
constexpr int64_t kChunk = 65536;
// Below this many values in total a call runs on one thread: a parallel region costs more.
constexpr int64_t kSerialBelow = 32768;

struct Chunking {
  int64_t per;    // planar: batch items n per chunk; rows: rows per chunk
  int64_t count;  // chunks
};

Chunking chunking(const Geometry& g) {
  const int64_t span = g.layout == Layout::Planar ? g.N : g.rows();
  const int64_t unit = g.layout == Layout::Planar ? g.S : g.C;
  int64_t per = std::max<int64_t>(1, kChunk / std::max<int64_t>(unit, 1));
  // wide rows: at least 256 rows per chunk while that leaves 8 chunks or more (fewer chunk
  // partials to merge, and the shift sample stays a small part of a chunk; measured 20% off the
  // statistics of a 4096 x 1024 input)
  if (g.layout == Layout::Rows) per = std::max(per, std::min<int64_t>(256, span / 8));
  per = std::min(per, std::max<int64_t>(span, 1));
  return {per, (span + per - 1) / per};
}

// Outputs of at least this many bytes are written with streaming stores (see write_run): 8 MiB
// unless BATCHNORM_STREAM_BYTES says otherwise (-1: never); the op set_stream_bytes changes it.
int64_t env_bytes(const char* name, int64_t fallback) {
  const char* e = std::getenv(name);
  return e != nullptr && *e != '\0' ? std::atoll(e) : fallback;
}

std::atomic<int64_t>& stream_threshold() {
  static std::atomic<int64_t> bytes{env_bytes("BATCHNORM_STREAM_BYTES", int64_t{8} << 20)};
  return bytes;
}

// ... and outputs of this many bytes or more are not (-1: no limit): 32 MiB unless
// BATCHNORM_STREAM_MAX_BYTES says otherwise; the op set_stream_max_bytes changes it. glibc's
// malloc serves every allocation above its mmap threshold (which grows to at most 32 MiB) with a
// fresh mapping, so such an output's pages are faulted in and zeroed by the kernel on first
// write; streaming stores into those pages measured 1.3-1.5x slower than ordinary ones (Intel
// Xeon, benchmarks/bm_layers.py --stream-bytes), while into reused pages they are 1.2-1.6x faster.
std::atomic<int64_t>& stream_limit() {
  static std::atomic<int64_t> bytes{env_bytes("BATCHNORM_STREAM_MAX_BYTES", int64_t{32} << 20)};
  return bytes;
}

template <typename F>
void parallel(int64_t n, int64_t total_values, const F& f) {
  if (total_values < kSerialBelow || n <= 1 || at::get_num_threads() == 1) {
    f(0, n);
  } else {
    at::parallel_for(0, n, 1, f);
  }
}

// A read-only view of an optional per-channel parameter (γ or β) in any floating dtype, read as
// double without an ATen conversion (this runs on every call).
struct ParamView {
  Tensor holder;  // keeps a contiguous copy alive when the parameter was not contiguous
  const void* data = nullptr;
  at::ScalarType type = at::kFloat;
  explicit operator bool() const { return data != nullptr; }
  // All C values as double into out (the dtype switch once, not per value); false if absent.
  bool fill(double* out, int64_t C) const {
    if (!data) return false;
    switch (type) {
      case at::kFloat: std::copy_n(static_cast<const float*>(data), C, out); break;
      case at::kDouble: std::copy_n(static_cast<const double*>(data), C, out); break;
      default:
        for (int64_t c = 0; c < C; ++c) out[c] = (*this)[c];
    }
    return true;
  }
  double operator[](int64_t c) const {
    switch (type) {
      case at::kFloat: return static_cast<const float*>(data)[c];
      case at::kDouble: return static_cast<const double*>(data)[c];
      case at::kHalf: return load(static_cast<const at::Half*>(data)[c]);
      case at::kBFloat16: return load(static_cast<const at::BFloat16*>(data)[c]);
      default: TORCH_CHECK(false, "batchnorm: unsupported parameter dtype ", type);
    }
  }
};

ParamView param_view(const std::optional<Tensor>& t, int64_t C, const char* what) {
  ParamView v;
  if (!t.has_value() || !t->defined()) return v;
  TORCH_CHECK(t->numel() == C, "batchnorm: expected ", what, " to have ", C,
              " values (one per channel), got shape ", t->sizes());
  TORCH_CHECK(t->device().is_cpu(), "batchnorm: ", what, " must be on the CPU like the input");
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "batchnorm: ", what,
              " must be floating point, got ", t->scalar_type());
  v.holder = t->is_contiguous() ? *t : t->contiguous();
  v.data = v.holder.const_data_ptr();
  v.type = v.holder.scalar_type();
  return v;
}

// A per-channel float64 vector as a raw pointer, converting only if it is not one already.
const double* double_vector(const Tensor& t, int64_t C, Tensor& holder, const char* what) {
  TORCH_CHECK(t.numel() == C, "batchnorm: expected ", what, " to have ", C, " values, got shape ",
              t.sizes());
  holder = (t.scalar_type() == at::kDouble && t.is_contiguous() && t.device().is_cpu())
               ? t
               : t.to(at::kDouble).contiguous().cpu();
  return holder.const_data_ptr<double>();
}

// Writes v[c] into a new per-channel tensor with the given options.
Tensor per_channel_tensor(const double* v, int64_t C, const at::TensorOptions& opts) {
  Tensor out = at::empty({C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "bn_vec", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) p[c] = static_cast<scalar_t>(v[c]);
  });
  return out;
}

// Per-channel constants of the elementwise passes, in the compute type (one allocation). With
// mean = mean_hi + lo (mean_hi in the compute type, lo the float64 rest):
//   forward:  y  = (x - mean_hi) * k1 + k3,            k1 = γ·inv, k3 = β - lo·k1
//   backward: dx = k1 * g - (k2 * (x - mean_hi) + k3)  (see backward_constants)
template <typename T>
struct ChannelAffine {
  using A = typename Compute<T>::type;
  explicit ChannelAffine(int64_t C) : storage(4 * C) {
    mean_hi = storage.data();
    k1 = mean_hi + C;
    k2 = k1 + C;
    k3 = k2 + C;
  }
  std::vector<A> storage;
  A *mean_hi, *k1, *k2, *k3;

  // Sets mean_hi[c]; returns lo = mean - mean_hi[c] in float64.
  double set_mean(int64_t c, double mean) {
    mean_hi[c] = static_cast<A>(mean);
    return mean - static_cast<double>(mean_hi[c]);
  }
  // y = (x - mean_hi)·k1 + k3 with k1 = γ/√(var + ε), k3 = β - (mean - mean_hi)·k1 (γ = 1 and
  // β = 0 when absent: 1·inv is inv exactly).
  void set_forward(int64_t c, double mean, double var, double eps, double gamma, double beta) {
    const double inv = 1.0 / std::sqrt(var + eps);
    const double lo = set_mean(c, mean);
    const double scale = gamma * inv;
    k1[c] = static_cast<A>(scale);
    k3[c] = static_cast<A>(beta - lo * scale);
  }
  void forward_constants(int64_t c, double mean, double var, double eps, const ParamView& gamma,
                         const ParamView& beta) {
    set_forward(c, mean, var, eps, gamma ? gamma[c] : 1.0, beta ? beta[c] : 0.0);
  }
  // forward_constants for every channel, in a loop the compiler vectorizes (gamma/beta: C
  // doubles or null).
  void forward_constants_all(int64_t C, const double* mean, const double* var, double eps,
                             const double* gamma, const double* beta) {
    for (int64_t c = 0; c < C; ++c)
      set_forward(c, mean[c], var[c], eps, gamma ? gamma[c] : 1.0, beta ? beta[c] : 0.0);
  }
  // dl/dx = γ·inv/m · (m g - Σg - x̂ Σg x̂) with x̂ = (x - mean)·inv and s2 = Σ g (x - mean)
  void backward_constants(int64_t c, double mean, double inv, double s1, double s2, double m,
                          const ParamView& gamma) {
    const double gm = gamma ? gamma[c] : 1.0;
    const double lo = set_mean(c, mean);
    const double b2 = gm * inv * inv * inv * s2 / m;
    k1[c] = static_cast<A>(gm * inv);
    k2[c] = static_cast<A>(b2);
    k3[c] = static_cast<A>(gm * inv * s1 / m - b2 * lo);
  }
};

// ----------------------------------------------------------------------------------------------
// The reductions: the only loops that sum over data.
//
// They use explicit 64-byte vectors (GCC/Clang vector extensions: AVX-512 here, two AVX2 halves
// elsewhere, NEON on ARM) with several independent accumulators, so a sum runs at load speed
// instead of waiting on one add chain. Each lane adds at most kBlock values in the compute type
// (float for float/16-bit inputs: a relative error of at most ~kBlock·2⁻²⁴ per block) before the
// block is flushed into float64 accumulators; the flush and the final horizontal sums run in a
// fixed order. `Two` says whether a second quantity is summed (the first pass sums only x).

constexpr int64_t kBlock = 16;
// The rows layout flushes every 64 rows instead (a relative error of at most ~64·2⁻²⁴ per block,
// on values centered by the shift): each flush widens 2 × 4 vectors into float64, a quarter of
// the work at 16 rows; measured 2-8% off the statistics of 4096 x 1024 and channels_last inputs.
constexpr int64_t kRowBlock = 64;

template <typename A>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int64_t L = 16;
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int64_t L = 8;
};
typedef VecOf<float>::type vf;
typedef VecOf<double>::type vd;

template <typename T>
using VecT = VecOf<typename Compute<T>::type>;

// L consecutive elements of T, in the compute type.
inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline vd vload(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// float16: GCC scalarizes a 16-lane _Float16 vector conversion, so use the hardware
// conversions where they exist (AVX-512F or F16C).
inline vf vload(const at::Half* p) {
  vf v;
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  std::memcpy(&v, &f, sizeof(v));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  std::memcpy(&v, &lo, sizeof(lo));
  std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
#else
  typedef _Float16 vh __attribute__((vector_size(32)));
  vh h;
  std::memcpy(&h, p, sizeof(h));
  v = __builtin_convertvector(h, vf);
#endif
  return v;
}
inline vf vload(const at::BFloat16* p) {
  typedef uint16_t vu16 __attribute__((vector_size(32)));
  typedef uint32_t vu32 __attribute__((vector_size(64)));
  vu16 h;
  std::memcpy(&h, p, sizeof(h));
  const vu32 w = __builtin_convertvector(h, vu32) << 16;
  vf f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

// Stores L lanes of the compute type as T (rounding to nearest even for 16-bit types).
inline void vstore(float* p, const vf& v) { std::memcpy(p, &v, sizeof(v)); }
inline void vstore(double* p, const vd& v) { std::memcpy(p, &v, sizeof(v)); }
// The 16 lanes of v rounded to 16-bit T, packed in one 32-byte vector (for vstore and, when
// streaming, stream_store). The pointer only selects the type.
typedef uint16_t vh16 __attribute__((vector_size(32)));
inline vh16 pack16(const at::Half*, const vf& v) {
  vh16 h;
#if defined(__AVX512F__)
  __m512 f;
  std::memcpy(&f, &v, sizeof(f));
  const __m256i m = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT);
  std::memcpy(&h, &m, sizeof(h));
#elif defined(__F16C__)
  __m256 lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  const __m128i a = _mm256_cvtps_ph(lo, _MM_FROUND_TO_NEAREST_INT);
  const __m128i b = _mm256_cvtps_ph(hi, _MM_FROUND_TO_NEAREST_INT);
  std::memcpy(&h, &a, sizeof(a));
  std::memcpy(reinterpret_cast<char*>(&h) + sizeof(a), &b, sizeof(b));
#else
  typedef _Float16 vh __attribute__((vector_size(32)));
  const vh f = __builtin_convertvector(v, vh);
  std::memcpy(&h, &f, sizeof(h));
#endif
  return h;
}
inline vh16 pack16(const at::BFloat16*, const vf& v) {
  typedef uint32_t vu32 __attribute__((vector_size(64)));
  vu32 u;
  std::memcpy(&u, &v, sizeof(u));
  const vu32 nan = reinterpret_cast<vu32>(v != v);  // all ones where v is NaN
  const vu32 r = ((u + 0x7FFFu + ((u >> 16) & 1u)) & ~nan) | (0x7FC00000u & nan);
  return __builtin_convertvector(r >> 16, vh16);
}
template <typename T, typename = std::enable_if_t<sizeof(T) == 2>>
inline void vstore(T* p, const vf& v) {
  const vh16 h = pack16(p, v);
  std::memcpy(p, &h, sizeof(h));
}

// acc (float64 lanes) += v (compute-type lanes), widening floats.
inline void widen_add(vd& lo, vd& hi, const vf& v) {
  lo += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), vd);
  hi += __builtin_convertvector(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15), vd);
}
inline void widen_add(vd& lo, vd& /*hi*/, const vd& v) { lo += v; }

// s[0..L) (float64 array) += v, widening floats.
inline void widen_store_add(double* s, const vf& v) {
  vd lo, hi;
  std::memcpy(&lo, s, sizeof(lo));
  std::memcpy(&hi, s + 8, sizeof(hi));
  widen_add(lo, hi, v);
  std::memcpy(s, &lo, sizeof(lo));
  std::memcpy(s + 8, &hi, sizeof(hi));
}
inline void widen_store_add(double* s, const vd& v) {
  vd a;
  std::memcpy(&a, s, sizeof(a));
  a += v;
  std::memcpy(s, &a, sizeof(a));
}

inline double hsum(const vd& lo, const vd& hi) {
  double s = 0.0;
  for (int i = 0; i < 8; ++i) s += lo[i];
  for (int i = 0; i < 8; ++i) s += hi[i];
  return s;
}

// Sums over a contiguous run p[0..n) of f(i) for up to two quantities, accumulated as above.
// `step(i, a, b)` adds the terms of the L elements at i into the vectors a and b;
// `scalar(i, a, b)` adds the terms of element i into doubles.
struct RunSums {
  vd lo1{}, hi1{}, lo2{}, hi2{};
  double t1 = 0.0, t2 = 0.0;
  void result(double& s1, double& s2) const {
    s1 = hsum(lo1, hi1) + t1;
    s2 = hsum(lo2, hi2) + t2;
  }
};

template <bool Two, typename V, int64_t L, typename Step, typename Scalar>
inline void run_sums(int64_t n, RunSums& r, const Step& step, const Scalar& scalar) {
  int64_t i = 0;
  do {
    V a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
    const int64_t end = i + std::min<int64_t>((n - i) / (4 * L), kBlock) * (4 * L);
    for (; i < end; i += 4 * L) {
      step(i, a0, b0);
      step(i + L, a1, b1);
      step(i + 2 * L, a2, b2);
      step(i + 3 * L, a3, b3);
    }
    if (n - i < 4 * L) {  // the last block also takes the remaining whole vectors (at most 3)
      if (i + L <= n) step(i, a0, b0), i += L;
      if (i + L <= n) step(i, a1, b1), i += L;
      if (i + L <= n) step(i, a2, b2), i += L;
    }
    widen_add(r.lo1, r.hi1, (a0 + a1) + (a2 + a3));
    if constexpr (Two) widen_add(r.lo2, r.hi2, (b0 + b1) + (b2 + b3));
  } while (i + 4 * L <= n);
  for (; i < n; ++i) scalar(i, r.t1, r.t2);
}

// Moments of one chunk of one channel. One pass over the chunk sums d and d² with d = x - K,
// K a shift taken from a few values of the chunk (the first values of up to 16 of its maps). A
// shifted one-pass M2 = Σd² - (Σd)²/n loses relative accuracy as (mean - K)²/σ² grows, so the
// result is kept only when |mean - K| <= σ/2 (error at most ~2x the two-pass one); otherwise a
// second pass, over the chunk while it is still in L1/L2, sums d = x - mean around the chunk's
// mean (no cancellation whatever the offset or the data order). K and the choice depend only on
// the chunk's values, so results still do not depend on the thread count.
struct ChunkMoments {
  double mean, m2;
};

// No elementwise work riding along a statistics pass (see planar_chunk_moments).
struct NoSide {
  void vec(int64_t, int64_t) const {}
  void scalar(int64_t, int64_t) const {}
};

template <typename T, typename Side = NoSide>
ChunkMoments planar_chunk_moments(const T* __restrict x, const Geometry& g, int64_t c,
                                  int64_t n0, int64_t n1, const Side& side = Side{}) {
  using A = typename Compute<T>::type;
  using V = typename VecT<T>::type;
  constexpr int64_t L = VecT<T>::L;
  const double count = static_cast<double>((n1 - n0) * g.S);
  // `side.vec(n, i)` / `side.scalar(n, i)` run at every position of the first pass (the
  // previous channel's normalization: see planar_driver), not in a second one
  auto centered_sums = [&](const auto& along, A center, double& sd, double& sdd) {
    RunSums r;
    for (int64_t n = n0; n < n1; ++n) {
      const T* __restrict p = x + (n * g.C + c) * g.S;
      run_sums<true, V, L>(
          g.S, r,
          [&](int64_t i, V& a, V& b) {
            along.vec(n, i);
            const V d = vload(p + i) - center;
            a += d;
            b += d * d;
          },
          [&](int64_t i, double& a, double& b) {
            along.scalar(n, i);
            const double d = static_cast<double>(load(p[i]) - center);
            a += d;
            b += d * d;
          });
    }
    r.result(sd, sdd);
  };
  // the shift: the mean of the first few values of up to 16 maps spread over the chunk, at most
  // L values per map and 1/16 of the chunk in all (small maps: the sample must stay cheap)
  const int64_t maps = std::min<int64_t>(n1 - n0, 16), stride = (n1 - n0) / maps;
  const int64_t head = std::clamp<int64_t>((n1 - n0) * g.S / (16 * maps), 1, std::min(g.S, L));
  double ks = 0.0;
  for (int64_t k = 0; k < maps; ++k) {
    const T* __restrict p = x + ((n0 + k * stride) * g.C + c) * g.S;
    for (int64_t i = 0; i < head; ++i) ks += static_cast<double>(load(p[i]));
  }
  A center = static_cast<A>(ks / static_cast<double>(maps * head));
  double sd, sdd;
  centered_sums(side, center, sd, sdd);
  double m2 = sdd - sd * (sd / count);
  const double offset = sd / count;  // mean - K
  if (!(4.0 * offset * offset * count <= m2)) {  // |mean - K| > σ/2 (or not finite): recenter
    center = static_cast<A>(static_cast<double>(center) + offset);
    centered_sums(NoSide{}, center, sd, sdd);
    m2 = sdd - sd * (sd / count);
  }
  return {static_cast<double>(center) + sd / count, m2 < 0.0 ? 0.0 : m2};
}

// Σg and Σg(x - mean_hi) over one chunk of one channel (the caller corrects for mean - mean_hi);
// `side` as in planar_chunk_moments.
template <typename T, typename Side = NoSide>
void planar_chunk_grad_sums(const T* __restrict gy, const T* __restrict x, const Geometry& g,
                            int64_t c, int64_t n0, int64_t n1, typename Compute<T>::type mh,
                            double& s1, double& s2, const Side& side = Side{}) {
  using V = typename VecT<T>::type;
  constexpr int64_t L = VecT<T>::L;
  RunSums r;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t off = (n * g.C + c) * g.S;
    const T* __restrict pg = gy + off;
    const T* __restrict px = x + off;
    run_sums<true, V, L>(
        g.S, r,
        [&](int64_t i, V& a, V& b) {
          side.vec(n, i);
          const V gv = vload(pg + i);
          a += gv;
          b += gv * (vload(px + i) - mh);
        },
        [&](int64_t i, double& a, double& b) {
          side.scalar(n, i);
          const auto gv = load(pg[i]);
          a += static_cast<double>(gv);
          b += static_cast<double>(gv * (load(px[i]) - mh));
        });
  }
  r.result(s1, s2);
}

// Rows layout: per-channel sums over a block of rows, vectorized across channels; each lane
// adds at most kRowBlock rows in the compute type before flushing into the float64 arrays.
// `step(r, c, a, b)` adds the terms of row r, channels [c, c + L); `scalar(r, c, a, b)` one value.
template <bool Two, typename V, int64_t L, typename Step, typename Scalar>
inline void rows_block_sums(int64_t C, int64_t r0, int64_t r1, double* __restrict s1,
                            double* __restrict s2, const Step& step, const Scalar& scalar) {
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t re = std::min(r1, rb + kRowBlock);
    int64_t c = 0;
    for (; c + 4 * L <= C; c += 4 * L) {  // four independent accumulator pairs per row
      V a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
      for (int64_t r = rb; r < re; ++r) {
        step(r, c, a0, b0);
        step(r, c + L, a1, b1);
        step(r, c + 2 * L, a2, b2);
        step(r, c + 3 * L, a3, b3);
      }
      widen_store_add(s1 + c, a0);
      widen_store_add(s1 + c + L, a1);
      widen_store_add(s1 + c + 2 * L, a2);
      widen_store_add(s1 + c + 3 * L, a3);
      if constexpr (Two) {
        widen_store_add(s2 + c, b0);
        widen_store_add(s2 + c + L, b1);
        widen_store_add(s2 + c + 2 * L, b2);
        widen_store_add(s2 + c + 3 * L, b3);
      }
    }
    for (; c + L <= C; c += L) {
      V a{}, b{};
      for (int64_t r = rb; r < re; ++r) step(r, c, a, b);
      widen_store_add(s1 + c, a);
      if constexpr (Two) widen_store_add(s2 + c, b);
    }
    if (c < C && C >= L) {
      // The last C - c < L channels: one vector ending at channel C, overlapping channels
      // already summed, of which only the new lanes are kept. The scalar loop below would run
      // a float64 dependency chain per channel: channels_last 32x24x56x56 (16 + 8 channels
      // with AVX-512) took 0.89x torch's time at 1 thread against 1.5x at C = 16, 32 or 48.
      const int64_t o = C - L;
      V a{}, b{};
      for (int64_t r = rb; r < re; ++r) step(r, o, a, b);
      for (int64_t k = c - o; k < L; ++k) {
        s1[o + k] += static_cast<double>(a[k]);
        if constexpr (Two) s2[o + k] += static_cast<double>(b[k]);
      }
      c = C;
    }
    for (; c < C; ++c) {
      double a = 0.0, b = 0.0;
      for (int64_t r = rb; r < re; ++r) scalar(r, c, a, b);
      s1[c] += a;
      s2[c] += b;
    }
  }
}

// Per-channel moments of rows [r0, r1), as planar_chunk_moments: one pass around per-channel
// shifts K (the mean of up to 16 rows spread over the chunk), redone for all channels, with the
// failing channels recentered on their chunk mean, when some channel's K is more than σ off
// (error at most ~2x the two-pass one; a tighter bound would redo nearly every chunk of a
// many-channel input, whose shifts come from fewer rows). Writes mean[C] and m2[C]; `scratch`
// holds 2·C doubles and `center` C compute values.
template <typename T>
void rows_chunk_moments(const T* __restrict x, const Geometry& g, int64_t r0, int64_t r1,
                        double* __restrict mean, double* __restrict m2, double* __restrict scratch,
                        typename Compute<T>::type* __restrict center) {
  using A = typename Compute<T>::type;
  using V = typename VecT<T>::type;
  constexpr int64_t L = VecT<T>::L;
  const int64_t C = g.C;
  const double count = static_cast<double>(r1 - r0);
  const int64_t samples = std::min<int64_t>(r1 - r0, 16), stride = (r1 - r0) / samples;
  double* sx = scratch;
  double* unused = scratch + C;
  std::fill(scratch, scratch + 2 * C, 0.0);
  rows_block_sums<false, V, L>(
      C, 0, samples, sx, unused,
      [&](int64_t k, int64_t c, V& a, V&) { a += vload(x + (r0 + k * stride) * C + c); },
      [&](int64_t k, int64_t c, double& a, double&) {
        a += static_cast<double>(load(x[(r0 + k * stride) * C + c]));
      });
  for (int64_t c = 0; c < C; ++c) center[c] = static_cast<A>(sx[c] / static_cast<double>(samples));
  auto centered_sums = [&] {
    std::fill(mean, mean + C, 0.0);
    std::fill(m2, m2 + C, 0.0);
    rows_block_sums<true, V, L>(
        C, r0, r1, mean, m2,
        [&](int64_t r, int64_t c, V& a, V& b) {
          V cv;
          std::memcpy(&cv, center + c, sizeof(cv));
          const V d = vload(x + r * C + c) - cv;
          a += d;
          b += d * d;
        },
        [&](int64_t r, int64_t c, double& a, double& b) {
          const double d = static_cast<double>(load(x[r * C + c]) - center[c]);
          a += d;
          b += d * d;
        });
  };
  centered_sums();
  bool redo = false;
  for (int64_t c = 0; c < C; ++c) {
    const double offset = mean[c] / count, v = m2[c] - mean[c] * offset;  // mean - K, M2
    if (!(offset * offset * count <= v)) {  // |mean - K| > σ (or not finite): recenter
      center[c] = static_cast<A>(static_cast<double>(center[c]) + offset);
      redo = true;
    }
  }
  if (redo) centered_sums();  // the other channels' sums come out the same
  for (int64_t c = 0; c < C; ++c) {
    const double sd = mean[c], v = m2[c] - sd * (sd / count);
    mean[c] = static_cast<double>(center[c]) + sd / count;
    m2[c] = v < 0.0 ? 0.0 : v;
  }
}

// Per-channel Σg and Σg(x - mean_hi) over rows [r0, r1), added into s1[C], s2[C].
template <typename T>
void rows_chunk_grad_sums(const T* __restrict gy, const T* __restrict x, const Geometry& g,
                          int64_t r0, int64_t r1, const typename Compute<T>::type* __restrict mh,
                          double* __restrict s1, double* __restrict s2) {
  using V = typename VecT<T>::type;
  constexpr int64_t L = VecT<T>::L;
  const int64_t C = g.C;
  rows_block_sums<true, V, L>(
      C, r0, r1, s1, s2,
      [&](int64_t r, int64_t c, V& a, V& b) {
        V h;
        std::memcpy(&h, mh + c, sizeof(h));
        const V gv = vload(gy + r * C + c);
        a += gv;
        b += gv * (vload(x + r * C + c) - h);
      },
      [&](int64_t r, int64_t c, double& a, double& b) {
        const auto gv = load(gy[r * C + c]);
        a += static_cast<double>(gv);
        b += static_cast<double>(gv * (load(x[r * C + c]) - mh[c]));
      });
}

// ----------------------------------------------------------------------------------------------
// The elementwise passes, in 64-byte vectors (scalar tails).

// Streaming (non-temporal) stores, used for large float32 and 16-bit outputs: a normal store reads
// the line it writes ("read for ownership"), so writing y costs two memory transfers per line; a
// streaming store writes the line without reading it and without keeping it in cache. Measured
// here (benchmarks/bm_stream.py): BN alone on 13-34 MB inputs 1.35-2.2x faster, and BN followed
// by ReLU and a residual add still 1.1-1.5x faster although the add now reads y from memory; on
// 6 MB outputs, which the next op otherwise finds in cache, that chain was up to 15% slower,
// hence the threshold in `stream_output`.
#if defined(__AVX512F__)
constexpr bool kCanStream = true;
inline void stream_store(float* p, const vf& v) {
  __m512 m;
  std::memcpy(&m, &v, sizeof(m));
  _mm512_stream_ps(p, m);
}
inline void stream_fence() { _mm_sfence(); }
#elif defined(__AVX__)
constexpr bool kCanStream = true;
inline void stream_store(float* p, const vf& v) {
  __m256 lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  _mm256_stream_ps(p, lo);
  _mm256_stream_ps(p + 8, hi);
}
inline void stream_fence() { _mm_sfence(); }
#else
constexpr bool kCanStream = false;
inline void stream_store(float* p, const vf& v) { vstore(p, v); }
inline void stream_fence() {}
#endif
// 16-bit outputs: half a cache line per vector (p 32-byte aligned); the two halves of a line are
// written one after the other, so the CPU's write-combining buffer still sends whole lines.
template <typename T, typename = std::enable_if_t<sizeof(T) == 2>>
inline void stream_store(T* p, const vf& v) {
#if defined(__AVX__)
  const vh16 h = pack16(p, v);
  __m256i m;
  std::memcpy(&m, &h, sizeof(m));
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), m);
#else
  vstore(p, v);
#endif
}

inline bool aligned64(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 63) == 0; }

// Stores one vector of the compute type at p, streaming when `stream` (p aligned to the stored
// vector: 64 bytes for float, 32 for 16-bit types).
template <typename T, typename V>
inline void vput(T* p, const V& v, bool stream) {
  if constexpr (!std::is_same_v<T, double>) {
    if (kCanStream && stream) {
      stream_store(p, v);
      return;
    }
  }
  vstore(p, v);
}

// q[i] for i in [0, n): vectors f(i) at the aligned positions when streaming, scalars fs(i) at
// the ends. The values do not depend on `stream`.
template <typename T, typename F, typename Fs>
inline void write_run(T* __restrict q, int64_t n, bool stream, const F& f, const Fs& fs) {
  constexpr int64_t L = VecT<T>::L;
  int64_t i = 0;
  if (stream)
    for (; i < n && !aligned64(q + i); ++i) store(q + i, fs(i));
  for (; i + L <= n; i += L) vput(q + i, f(i), stream);
  for (; i < n; ++i) store(q + i, fs(i));
}

// Whether a pass writing `out` with geometry g streams: float32 or 16-bit, at least
// stream_threshold() and less than stream_limit() bytes, and for the rows layout every row
// starting 64-byte aligned.
template <typename T>
inline bool stream_output(const T* out, const Geometry& g) {
  if (std::is_same_v<T, double> || !kCanStream) return false;
  const int64_t threshold = stream_threshold().load(std::memory_order_relaxed);
  const int64_t limit = stream_limit().load(std::memory_order_relaxed);
  const int64_t bytes = g.total() * static_cast<int64_t>(sizeof(T));
  if (threshold < 0 || bytes < threshold || (limit >= 0 && bytes >= limit)) return false;
  return g.layout == Layout::Planar ||
         ((g.C * static_cast<int64_t>(sizeof(T))) % 64 == 0 && aligned64(out));
}

// Whether planar_driver may run a channel's elementwise pass writing `out` inside the next
// channel's reduction: always, unless streaming stores would land on maps that do not start
// aligned to a vector (S not a whole number of vectors).
template <typename T>
inline bool pipelines(const T* out, const Geometry& g) {
  return !stream_output(out, g) || (g.S % VecT<T>::L == 0 && aligned64(out));
}

// The elementwise passes over channel c of a planar input, forward (y = (x - mean_hi)·k1 + k3)
// and backward (dx = k1·g - (k2·(x - mean_hi) + k3)). `run(n0, n1)` writes maps [n0, n1);
// `vec(n, i)` / `scalar(n, i)` write one position of map n, for planar_driver, which runs them
// inside another channel's reduction pass (with `stream`, out + off must then be vector-aligned).
template <typename T, typename Derived>
struct PlanarPass {
  T* out;
  int64_t C, S, c;
  bool stream;
  const Derived& self() const { return static_cast<const Derived&>(*this); }
  void vec(int64_t n, int64_t i) const {
    const int64_t off = (n * C + c) * S + i;
    vput(out + off, self().value(off), stream);
  }
  void scalar(int64_t n, int64_t i) const {
    const int64_t off = (n * C + c) * S + i;
    store(out + off, self().value1(off));
  }
  void run(int64_t n0, int64_t n1) const {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t off = (n * C + c) * S;
      write_run(
          out + off, S, stream, [&](int64_t s) { return self().value(off + s); },
          [&](int64_t s) { return self().value1(off + s); });
    }
    if (stream) stream_fence();
  }
};

template <typename T>
struct PlanarForward : PlanarPass<T, PlanarForward<T>> {
  using A = typename Compute<T>::type;
  PlanarForward(const T* x, T* y, const Geometry& g, int64_t c, const ChannelAffine<T>& a)
      : PlanarPass<T, PlanarForward<T>>{y, g.C, g.S, c, stream_output(y, g)}, x(x),
        mh(a.mean_hi[c]), k1(a.k1[c]), k3(a.k3[c]) {}
  const T* x;
  A mh, k1, k3;
  auto value(int64_t off) const { return (vload(x + off) - mh) * k1 + k3; }
  A value1(int64_t off) const { return (load(x[off]) - mh) * k1 + k3; }
};

template <typename T>
struct PlanarBackward : PlanarPass<T, PlanarBackward<T>> {
  using A = typename Compute<T>::type;
  PlanarBackward(const T* gy, const T* x, T* dx, const Geometry& g, int64_t c,
                 const ChannelAffine<T>& a)
      : PlanarPass<T, PlanarBackward<T>>{dx, g.C, g.S, c, stream_output(dx, g)}, gy(gy), x(x),
        mh(a.mean_hi[c]), k1(a.k1[c]), k2(a.k2[c]), k3(a.k3[c]) {}
  const T *gy, *x;
  A mh, k1, k2, k3;
  auto value(int64_t off) const { return k1 * vload(gy + off) - (k2 * (vload(x + off) - mh) + k3); }
  A value1(int64_t off) const { return k1 * load(gy[off]) - (k2 * (load(x[off]) - mh) + k3); }
};

template <typename T>
inline void planar_forward(const T* x, T* y, const Geometry& g, int64_t c, int64_t n0, int64_t n1,
                           const ChannelAffine<T>& a) {
  PlanarForward<T>(x, y, g, c, a).run(n0, n1);
}

template <typename T>
inline void planar_backward(const T* gy, const T* x, T* dx, const Geometry& g, int64_t c,
                            int64_t n0, int64_t n1, const ChannelAffine<T>& a) {
  PlanarBackward<T>(gy, x, dx, g, c, a).run(n0, n1);
}

// rows_overlap: with C >= L, the last C % L channels of a row are one vector ending at channel C,
// overlapping channels already done (rewritten with the same values: the output is never the
// input, and never streamed when C % L != 0), instead of a scalar loop.
template <typename T>
inline void rows_forward(const T* __restrict x, T* __restrict y, const Geometry& g, int64_t r0,
                         int64_t r1, const ChannelAffine<T>& a) {
  using V = typename VecT<T>::type;
  constexpr int64_t L = VecT<T>::L;
  const int64_t C = g.C;
  const bool stream = stream_output(y, g);
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict p = x + r * C;
    T* __restrict q = y + r * C;
    auto vec = [&](int64_t c, bool streamed) {
      V mh, k1, k3;
      std::memcpy(&mh, a.mean_hi + c, sizeof(V));
      std::memcpy(&k1, a.k1 + c, sizeof(V));
      std::memcpy(&k3, a.k3 + c, sizeof(V));
      vput(q + c, (vload(p + c) - mh) * k1 + k3, streamed);
    };
    int64_t c = 0;
    for (; c + L <= C; c += L) vec(c, stream);
    if (c < C && C >= L) vec(C - L, false), c = C;  // the tail: see rows_overlap
    for (; c < C; ++c) store(q + c, (load(p[c]) - a.mean_hi[c]) * a.k1[c] + a.k3[c]);
  }
  if (stream) stream_fence();
}

template <typename T>
inline void rows_backward(const T* __restrict gy, const T* __restrict x, T* __restrict dx,
                          const Geometry& g, int64_t r0, int64_t r1, const ChannelAffine<T>& a) {
  using V = typename VecT<T>::type;
  constexpr int64_t L = VecT<T>::L;
  const int64_t C = g.C;
  const bool stream = stream_output(dx, g);
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict pg = gy + r * C;
    const T* __restrict px = x + r * C;
    T* __restrict q = dx + r * C;
    auto vec = [&](int64_t c, bool streamed) {
      V mh, k1, k2, k3;
      std::memcpy(&mh, a.mean_hi + c, sizeof(V));
      std::memcpy(&k1, a.k1 + c, sizeof(V));
      std::memcpy(&k2, a.k2 + c, sizeof(V));
      std::memcpy(&k3, a.k3 + c, sizeof(V));
      vput(q + c, k1 * vload(pg + c) - (k2 * (vload(px + c) - mh) + k3), streamed);
    };
    int64_t c = 0;
    for (; c + L <= C; c += L) vec(c, stream);
    if (c < C && C >= L) vec(C - L, false), c = C;  // the tail: see rows_overlap
    for (; c < C; ++c)
      store(q + c, a.k1[c] * load(pg[c]) - (a.k2[c] * (load(px[c]) - a.mean_hi[c]) + a.k3[c]));
  }
  if (stream) stream_fence();
}

// ----------------------------------------------------------------------------------------------
// Drivers: per-chunk partial results, a per-channel finish over the chunks in order, and
// optionally an elementwise pass.
//
// Chunk partials are two doubles per (chunk, channel): (mean, M2) for the forward, (Σg,
// Σg(x - mean)) for the backward; `Partials` reads them back for the finish.
//
// Planar: `sums(c, n0, n1, rec)` fills the two doubles of one chunk of channel c;
// `finish(c, partials)` combines the chunks of channel c; `apply(c, n0, n1)` is the elementwise
// pass. With at least as many channels as threads, each channel's task runs sums, finish and
// apply back to back while the channel is in cache. Otherwise the chunks of all channels are
// reduced in parallel, finished, and the pass runs in parallel over chunks. Either way the same
// numbers are combined in the same order, so results do not depend on the thread count.

// Chan et al.'s merge of a part (mean_b, m2_b) of nb values into (mean, m2) of n values, given
// wb = nb / (n + nb) and wab = n·nb / (n + nb).
inline void chan_merge(double& mean, double& m2, double mean_b, double m2_b, double wb,
                       double wab) {
  const double delta = mean_b - mean;
  mean += delta * wb;
  m2 += m2_b + delta * delta * wab;
}

struct Partials {
  const double* base;
  int64_t k_stride, second;  // first(k) = base[k * k_stride], second(k) = base[... + second]
  Chunking ch;
  int64_t span, unit;  // chunk k holds min(per, span - k * per) * unit values
  double first_of(int64_t k) const { return base[k * k_stride]; }
  double second_of(int64_t k) const { return base[k * k_stride + second]; }
  double count(int64_t k) const {
    return static_cast<double>(std::min(ch.per, span - k * ch.per) * unit);
  }
  // Chan et al.'s merge of per-chunk (mean, M2), in chunk order.
  void merged_moments(double& mean, double& m2) const {
    double n = 0.0;
    mean = 0.0;
    m2 = 0.0;
    for (int64_t k = 0; k < ch.count; ++k) {
      const double nb = count(k), total = n + nb;
      chan_merge(mean, m2, first_of(k), second_of(k), nb / total, n * nb / total);
      n = total;
    }
  }
  void summed(double& s1, double& s2) const {
    s1 = 0.0;
    s2 = 0.0;
    for (int64_t k = 0; k < ch.count; ++k) {
      s1 += first_of(k);
      s2 += second_of(k);
    }
  }
};

//
// `sums(c, n0, n1, rec, prev)` may also normalize channel `prev` over the same maps in the same
// loop (prev >= 0, only when `pipeline`): the statistics pass of channel c then reads from memory
// while the previous channel's output is written, instead of one after the other.
template <typename Sums, typename Finish, typename Apply>
void planar_driver(const Geometry& g, const Sums& sums, const Finish& finish, const Apply& apply,
                   bool has_apply, bool pipeline) {
  const Chunking ch = chunking(g);
  const int64_t C = g.C;
  auto run_chunk = [&](int64_t c, int64_t k, double* rec, int64_t prev) {
    const int64_t n0 = k * ch.per;
    sums(c, n0, std::min(g.N, n0 + ch.per), rec, prev);
  };
  if (C >= at::get_num_threads() || g.total() < kSerialBelow) {
    const bool piped = has_apply && pipeline;
    parallel(C, g.total(), [&](int64_t c0, int64_t c1) {
      std::vector<double> part(2 * ch.count);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t prev = piped && c > c0 ? c - 1 : -1;  // normalized during c's pass
        for (int64_t k = 0; k < ch.count; ++k) run_chunk(c, k, &part[2 * k], prev);
        finish(c, Partials{part.data(), 2, 1, ch, g.N, g.S});
        if (has_apply && !(piped && c + 1 < c1)) apply(c, int64_t{0}, g.N);
      }
    });
    return;
  }
  const int64_t items = C * ch.count;
  std::vector<double> part(2 * items);
  parallel(items, g.total(), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) run_chunk(i / ch.count, i % ch.count, &part[2 * i], -1);
  });
  for (int64_t c = 0; c < C; ++c)
    finish(c, Partials{&part[2 * c * ch.count], 2, 1, ch, g.N, g.S});
  if (!has_apply) return;
  parallel(items, g.total(), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n0 = (i % ch.count) * ch.per;
      apply(i / ch.count, n0, std::min(g.N, n0 + ch.per));
    }
  });
}

// Rows: `sums(r0, r1, first, second)` fills per-channel arrays first[C], second[C] for one chunk
// of rows; the chunks are combined channel by channel in contiguous memory (the same per-channel
// arithmetic, in the same chunk order, as Partials); `finish(first, second)` gets the combined
// arrays of all channels; `apply(r0, r1)` is the pass.
template <typename Sums, typename Finish, typename Apply>
void rows_driver(const Geometry& g, const Sums& sums, const Finish& finish, const Apply& apply,
                 bool has_apply, bool moments) {
  const Chunking ch = chunking(g);
  const int64_t C = g.C;
  std::vector<double> part(2 * ch.count * C, 0.0);
  parallel(ch.count, g.total(), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = k * ch.per;
      sums(r0, std::min(g.rows(), r0 + ch.per), &part[2 * k * C], &part[(2 * k + 1) * C]);
    }
  });
  // Combine chunk 0..count-1 into chunk 0's arrays, sweeping channels contiguously.
  double* first = part.data();
  double* second = part.data() + C;
  double n = static_cast<double>(std::min(ch.per, g.rows()));
  for (int64_t k = 1; k < ch.count; ++k) {
    const double* f = &part[2 * k * C];
    const double* s = &part[(2 * k + 1) * C];
    const double nb = static_cast<double>(std::min(ch.per, g.rows() - k * ch.per));
    const double total = n + nb, wb = nb / total, wab = n * nb / total;
    if (moments) {
      for (int64_t c = 0; c < C; ++c) chan_merge(first[c], second[c], f[c], s[c], wb, wab);
    } else {
      for (int64_t c = 0; c < C; ++c) {
        first[c] += f[c];
        second[c] += s[c];
      }
    }
    n = total;
  }
  finish(static_cast<const double*>(first), static_cast<const double*>(second));
  if (!has_apply) return;
  parallel(ch.count, g.total(), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = k * ch.per;
      apply(r0, std::min(g.rows(), r0 + ch.per));
    }
  });
}

// ----------------------------------------------------------------------------------------------
// The kernels, per dtype.

// Statistics (Alg. 1: μ_B, biased σ²_B), and when `y` is given also y = BN(x) with `a`.
template <typename T>
void forward_kernel(const T* x, T* y, const Geometry& g, double* mean, double* var,
                    ChannelAffine<T>* a, double eps, const ParamView& gamma,
                    const ParamView& beta) {
  using A = typename Compute<T>::type;
  const double m = static_cast<double>(g.m);
  const bool apply = y != nullptr;
  auto finish = [&](int64_t c, const Partials& p) {
    double m2;
    p.merged_moments(mean[c], m2);
    var[c] = m2 / m;  // Alg. 1: the biased variance
    if (apply) a->forward_constants(c, mean[c], var[c], eps, gamma, beta);
  };
  if (g.layout == Layout::Planar) {
    planar_driver(
        g,
        [&](int64_t c, int64_t n0, int64_t n1, double* rec, int64_t prev) {
          ChunkMoments cm;
          if (prev < 0) {
            cm = planar_chunk_moments(x, g, c, n0, n1);
          } else {
            const PlanarForward<T> along(x, y, g, prev, *a);
            cm = planar_chunk_moments(x, g, c, n0, n1, along);
            if (along.stream) stream_fence();
          }
          rec[0] = cm.mean;
          rec[1] = cm.m2;
        },
        finish, [&](int64_t c, int64_t n0, int64_t n1) { planar_forward(x, y, g, c, n0, n1, *a); },
        apply, apply && pipelines(y, g));
  } else {
    rows_driver(
        g,
        [&](int64_t r0, int64_t r1, double* chunk_mean, double* chunk_m2) {
          // per-thread scratch, reused across chunks and calls
          thread_local std::vector<double> scratch;
          thread_local std::vector<A> center;
          scratch.resize(2 * g.C);
          center.resize(g.C);
          rows_chunk_moments(x, g, r0, r1, chunk_mean, chunk_m2, scratch.data(), center.data());
        },
        [&](const double* merged_mean, const double* merged_m2) {
          for (int64_t c = 0; c < g.C; ++c) {
            mean[c] = merged_mean[c];
            var[c] = merged_m2[c] / m;  // Alg. 1: the biased variance
          }
          if (!apply) return;
          std::vector<double> params(2 * g.C);
          const bool has_g = gamma.fill(params.data(), g.C);
          const bool has_b = beta.fill(params.data() + g.C, g.C);
          a->forward_constants_all(g.C, mean, var, eps, has_g ? params.data() : nullptr,
                                   has_b ? params.data() + g.C : nullptr);
        },
        [&](int64_t r0, int64_t r1) { rows_forward(x, y, g, r0, r1, *a); }, apply,
        /*moments=*/true);
  }
}

// y = BN(x) with given per-channel constants (normalize with statistics from elsewhere).
template <typename T>
void apply_forward(const T* x, T* y, const Geometry& g, const ChannelAffine<T>& a) {
  const Chunking ch = chunking(g);
  if (g.layout == Layout::Planar) {
    parallel(g.C * ch.count, g.total(), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n0 = (i % ch.count) * ch.per;
        planar_forward(x, y, g, i / ch.count, n0, std::min(g.N, n0 + ch.per), a);
      }
    });
  } else {
    parallel(ch.count, g.total(), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        rows_forward(x, y, g, k * ch.per, std::min(g.rows(), (k + 1) * ch.per), a);
    });
  }
}

// Σg and Σg(x - mean) per channel; when `dx` is given also dx from those sums over m values
// (the local backward). `a` receives the mean split and the backward constants.
template <typename T>
void backward_kernel(const T* gy, const T* x, T* dx, const Geometry& g, const double* mean,
                     const double* inv, ChannelAffine<T>& a, const ParamView& gamma,
                     double* sum_g, double* sum_gc) {
  const double m = static_cast<double>(g.m);
  const bool apply = dx != nullptr;
  std::vector<double> lo(g.C);
  for (int64_t c = 0; c < g.C; ++c) lo[c] = a.set_mean(c, mean[c]);
  auto finish = [&](int64_t c, const Partials& p) {
    double s2;
    p.summed(sum_g[c], s2);
    sum_gc[c] = s2 - lo[c] * sum_g[c];  // Σg(x - mean) = Σg(x - mean_hi) - lo·Σg
    if (apply) a.backward_constants(c, mean[c], inv[c], sum_g[c], sum_gc[c], m, gamma);
  };
  if (g.layout == Layout::Planar) {
    planar_driver(
        g,
        [&](int64_t c, int64_t n0, int64_t n1, double* rec, int64_t prev) {
          if (prev < 0) {
            planar_chunk_grad_sums(gy, x, g, c, n0, n1, a.mean_hi[c], rec[0], rec[1]);
          } else {
            const PlanarBackward<T> along(gy, x, dx, g, prev, a);
            planar_chunk_grad_sums(gy, x, g, c, n0, n1, a.mean_hi[c], rec[0], rec[1], along);
            if (along.stream) stream_fence();
          }
        },
        finish,
        [&](int64_t c, int64_t n0, int64_t n1) { planar_backward(gy, x, dx, g, c, n0, n1, a); },
        apply, apply && pipelines(dx, g));
  } else {
    rows_driver(
        g,
        [&](int64_t r0, int64_t r1, double* s1, double* s2) {
          rows_chunk_grad_sums(gy, x, g, r0, r1, a.mean_hi, s1, s2);
        },
        [&](const double* s1, const double* s2) {
          for (int64_t c = 0; c < g.C; ++c) {
            sum_g[c] = s1[c];
            sum_gc[c] = s2[c] - lo[c] * s1[c];  // Σg(x - mean) = Σg(x - mean_hi) - lo·Σg
          }
          if (apply)
            for (int64_t c = 0; c < g.C; ++c)
              a.backward_constants(c, mean[c], inv[c], sum_g[c], sum_gc[c], m, gamma);
        },
        [&](int64_t r0, int64_t r1) { rows_backward(gy, x, dx, g, r0, r1, a); }, apply,
        /*moments=*/false);
  }
}

template <typename T>
void apply_backward(const T* gy, const T* x, T* dx, const Geometry& g, const ChannelAffine<T>& a) {
  const Chunking ch = chunking(g);
  if (g.layout == Layout::Planar) {
    parallel(g.C * ch.count, g.total(), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n0 = (i % ch.count) * ch.per;
        planar_backward(gy, x, dx, g, i / ch.count, n0, std::min(g.N, n0 + ch.per), a);
      }
    });
  } else {
    parallel(ch.count, g.total(), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        rows_backward(gy, x, dx, g, k * ch.per, std::min(g.rows(), (k + 1) * ch.per), a);
    });
  }
}

#define BN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ----------------------------------------------------------------------------------------------
// Running statistics: torch's update rule, refusing non-finite batch statistics.

// Adds one to a 0-dim int64 CPU counter in place; returns its old value. (No ATen op: this runs
// on every training step and a dispatch costs more than the arithmetic.)
int64_t bump(const Tensor& counter) {
  TORCH_CHECK(counter.numel() == 1 && counter.scalar_type() == at::kLong &&
                  counter.device().is_cpu(),
              "batchnorm: counters must be int64 CPU scalars, got ", counter.scalar_type(), " ",
              counter.sizes());
  int64_t* p = counter.mutable_data_ptr<int64_t>();
  const int64_t old = *p;
  *p = old + 1;
  torch::autograd::impl::bump_version(counter);
  return old;
}

void update_running_stats(const double* mean, const double* var, int64_t C, int64_t m,
                          const std::optional<Tensor>& running_mean,
                          const std::optional<Tensor>& running_var,
                          const std::optional<Tensor>& num_batches_tracked,
                          const std::optional<Tensor>& nonfinite_count,
                          std::optional<double> momentum, bool guard) {
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  if (!has_mean && !has_var) return;
  if (guard) {
    bool finite = true;
    for (int64_t c = 0; c < C && finite; ++c)
      finite = std::isfinite(mean[c]) && std::isfinite(var[c]);
    if (!finite) {
      // Python sees the counter move and warns (C++ warnings do not reach Python's `warnings`).
      if (nonfinite_count.has_value() && nonfinite_count->defined()) bump(*nonfinite_count);
      return;
    }
  }
  double factor;
  if (momentum.has_value()) {
    factor = *momentum;
    if (num_batches_tracked.has_value() && num_batches_tracked->defined())
      bump(*num_batches_tracked);
  } else {  // cumulative moving average: 1 / num_batches_tracked after the increment
    TORCH_CHECK(num_batches_tracked.has_value() && num_batches_tracked->defined(),
                "batchnorm: momentum=None (cumulative average) needs num_batches_tracked");
    factor = 1.0 / static_cast<double>(bump(*num_batches_tracked) + 1);
  }
  const double bessel = m > 1 ? static_cast<double>(m) / static_cast<double>(m - 1) : 1.0;
  auto update = [&](const Tensor& buf, const double* batch, double scale) {  // checked by the caller
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf.scalar_type(), "bn_update", [&] {
      scalar_t* p = buf.mutable_data_ptr<scalar_t>();
      const int64_t step = buf.is_contiguous() ? 1 : buf.stride(0);  // a strided vector, as torch
      for (int64_t c = 0; c < C; ++c) {
        const double old = static_cast<double>(p[c * step]);
        p[c * step] = static_cast<scalar_t>((1.0 - factor) * old + factor * batch[c] * scale);
      }
    });
    torch::autograd::impl::bump_version(buf);
  };
  if (has_mean) update(*running_mean, mean, 1.0);
  if (has_var) update(*running_var, var, bessel);  // running_var stores the unbiased variance
}

// An uninitialized tensor shaped and laid out like `like`, whose data starts half a page (mod
// 4 KB) away from `input`'s (a view at a storage offset into a slightly larger allocation). The
// backward's elementwise pass loads x and dy and stores dx at the same offsets; when they sit at
// the same address mod 4 KB, loads after a store to that page offset are held up by the CPU's
// store-to-load aliasing check ("4K aliasing"): measured here, 15-30% of the pass. Large
// allocations come back page-aligned, so by default they do. (The forward showed no such cost.)
Tensor empty_output(const Tensor& like, const Tensor& input) {
  constexpr int64_t kPage = 4096, kHalf = 2048;
  const int64_t size = like.element_size();
  if (like.numel() * size < 16 * kPage) return at::empty_like(like);  // small: fits in L1/L2
  const int64_t pad = kPage / size;
  Tensor base = at::empty({like.numel() + pad}, like.options());
  const auto in = reinterpret_cast<uintptr_t>(input.const_data_ptr());
  const auto out = reinterpret_cast<uintptr_t>(base.const_data_ptr());
  // whole cache lines, so the output stays as aligned as the allocator made it
  const int64_t shift = static_cast<int64_t>(((in + kHalf - out) % kPage) & ~uintptr_t{63}) / size;
  return base.as_strided(like.sizes(), like.strides(), shift);
}

// ----------------------------------------------------------------------------------------------
// CPU kernels of the ops.

std::tuple<Tensor, Tensor, Tensor> train_forward_cpu(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    const std::optional<Tensor>& num_batches_tracked,
    const std::optional<Tensor>& nonfinite_count, std::optional<double> momentum, double eps,
    bool guard) {
  auto [g, x] = geometry_of(input);
  TORCH_CHECK(g.m != 1, "Expected more than 1 value per channel when training, got input size ",
              input.sizes());
  TORCH_CHECK(eps > 0, "batchnorm: eps must be positive during training, got ", eps);
  const bool updates = (running_mean.has_value() && running_mean->defined()) ||
                       (running_var.has_value() && running_var->defined());
  TORCH_CHECK(!updates || !momentum || (*momentum >= 0 && *momentum <= 1),
              "batchnorm: momentum must be in [0, 1] or None, got ", *momentum);
  // Every check before anything is written: a refused call changes no buffer.
  for (const auto* buf : {&running_mean, &running_var})
    TORCH_CHECK(!buf->has_value() || !(*buf)->defined() ||
                    ((*buf)->numel() == g.C &&
                     ((*buf)->is_contiguous() || ((*buf)->dim() == 1 && (*buf)->stride(0) > 0)) &&
                     (*buf)->device().is_cpu() && at::isFloatingType((*buf)->scalar_type())),
                "batchnorm: running statistics must be floating-point CPU vectors of ", g.C,
                " values (contiguous, or 1-D with a positive stride), got shape ",
                (*buf)->sizes(), " and strides ", (*buf)->strides());
  const ParamView gamma = param_view(weight, g.C, "weight");
  const ParamView beta = param_view(bias, g.C, "bias");
  Tensor y = at::empty_like(x);
  auto opts = input.options().dtype(at::kDouble);
  if (g.total() == 0) {  // an empty batch (as torch): an empty output, no statistics, no update
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {y, at::full({g.C}, nan, opts), at::full({g.C}, nan, opts)};
  }
  Tensor mean = at::empty({g.C}, opts);
  Tensor var = at::empty({g.C}, opts);
  BN_DISPATCH(x.scalar_type(), "batchnorm_train_forward", [&] {
    ChannelAffine<scalar_t> a(g.C);
    forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g,
                             mean.data_ptr<double>(), var.data_ptr<double>(), &a, eps, gamma,
                             beta);
  });
  update_running_stats(mean.data_ptr<double>(), var.data_ptr<double>(), g.C, g.m, running_mean,
                       running_var, num_batches_tracked, nonfinite_count, momentum, guard);
  return {y, mean, var};
}

std::tuple<Tensor, Tensor, Tensor> train_backward_cpu(const Tensor& grad_out,
                                                      const Tensor& input, const Tensor& mean,
                                                      const Tensor& var,
                                                      const std::optional<Tensor>& weight,
                                                      double eps, std::array<bool, 3> mask) {
  auto [g, x] = geometry_of(input);
  Tensor gy = like_input(grad_out, x, g);
  const ParamView gamma = param_view(weight, g.C, "weight");
  Tensor mean_holder, var_holder;
  const double* mean_p = double_vector(mean, g.C, mean_holder, "mean");
  const double* var_p = double_vector(var, g.C, var_holder, "var");
  std::vector<double> inv(g.C), sum_g(g.C), sum_gc(g.C);
  // An empty batch has no statistics (the forward returns NaN for them): every sum is an empty
  // sum, 0, and so are dl/dgamma = sum g x_hat and dl/dbeta = sum g, as in torch; an inv of NaN
  // would turn dl/dgamma into 0 * NaN.
  for (int64_t c = 0; c < g.C; ++c) inv[c] = g.total() > 0 ? 1.0 / std::sqrt(var_p[c] + eps) : 0.0;
  Tensor dx = mask[0] ? empty_output(x, x) : Tensor();
  if (g.total() > 0) BN_DISPATCH(x.scalar_type(), "batchnorm_train_backward", [&] {
    ChannelAffine<scalar_t> a(g.C);
    backward_kernel<scalar_t>(gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                              mask[0] ? dx.mutable_data_ptr<scalar_t>() : nullptr, g, mean_p,
                              inv.data(), a, gamma, sum_g.data(), sum_gc.data());
  });
  Tensor dw, db;
  const auto param_opts = input.options().dtype(gamma ? gamma.type : input.scalar_type());
  if (mask[1]) {
    for (int64_t c = 0; c < g.C; ++c) sum_gc[c] *= inv[c];  // dl/dgamma = Σ g x̂
    dw = per_channel_tensor(sum_gc.data(), g.C, param_opts);
  }
  if (mask[2]) db = per_channel_tensor(sum_g.data(), g.C, param_opts);  // dl/dbeta = Σ g
  return {dx, dw, db};
}

std::tuple<Tensor, Tensor> moments_cpu(const Tensor& input) {
  auto [g, x] = geometry_of(input);
  TORCH_CHECK(g.m > 0, "batchnorm: moments of an input with no values per channel: ",
              input.sizes());
  auto opts = input.options().dtype(at::kDouble);
  Tensor mean = at::empty({g.C}, opts);
  Tensor var = at::empty({g.C}, opts);
  BN_DISPATCH(x.scalar_type(), "batchnorm_moments", [&] {
    forward_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), nullptr, g, mean.data_ptr<double>(),
                             var.data_ptr<double>(), nullptr, 0.0, ParamView(), ParamView());
  });
  return {mean, var};
}

Tensor normalize_cpu(const Tensor& input, const Tensor& mean, const Tensor& var,
                     const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                     double eps) {
  auto [g, x] = geometry_of(input);
  const ParamView gamma = param_view(weight, g.C, "weight");
  const ParamView beta = param_view(bias, g.C, "bias");
  Tensor mh, vh;
  const double* mean_p = double_vector(mean, g.C, mh, "mean");
  const double* var_p = double_vector(var, g.C, vh, "var");
  Tensor y = at::empty_like(x);
  BN_DISPATCH(x.scalar_type(), "batchnorm_normalize", [&] {
    ChannelAffine<scalar_t> a(g.C);
    for (int64_t c = 0; c < g.C; ++c) a.forward_constants(c, mean_p[c], var_p[c], eps, gamma, beta);
    apply_forward<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), g, a);
  });
  return y;
}

std::tuple<Tensor, Tensor> backward_reduce_cpu(const Tensor& grad_out, const Tensor& input,
                                               const Tensor& mean) {
  auto [g, x] = geometry_of(input);
  Tensor gy = like_input(grad_out, x, g);
  Tensor mh;
  const double* mean_p = double_vector(mean, g.C, mh, "mean");
  auto opts = input.options().dtype(at::kDouble);
  Tensor sum_g = at::empty({g.C}, opts);
  Tensor sum_gc = at::empty({g.C}, opts);
  BN_DISPATCH(x.scalar_type(), "batchnorm_backward_reduce", [&] {
    ChannelAffine<scalar_t> a(g.C);
    backward_kernel<scalar_t>(gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), nullptr,
                              g, mean_p, nullptr, a, ParamView(), sum_g.data_ptr<double>(),
                              sum_gc.data_ptr<double>());
  });
  return {sum_g, sum_gc};
}

Tensor backward_elementwise_cpu(const Tensor& grad_out, const Tensor& input, const Tensor& mean,
                                const Tensor& var, const std::optional<Tensor>& weight,
                                const Tensor& sum_g, const Tensor& sum_gc, int64_t count,
                                double eps) {
  auto [g, x] = geometry_of(input);
  TORCH_CHECK(count > 0, "batchnorm: backward_elementwise needs a positive count, got ", count);
  Tensor gy = like_input(grad_out, x, g);
  const ParamView gamma = param_view(weight, g.C, "weight");
  Tensor h1, h2, h3, h4;
  const double* mean_p = double_vector(mean, g.C, h1, "mean");
  const double* var_p = double_vector(var, g.C, h2, "var");
  const double* sg = double_vector(sum_g, g.C, h3, "sum_g");
  const double* sgc = double_vector(sum_gc, g.C, h4, "sum_gc");
  Tensor dx = empty_output(x, x);
  BN_DISPATCH(x.scalar_type(), "batchnorm_backward_elementwise", [&] {
    ChannelAffine<scalar_t> a(g.C);
    for (int64_t c = 0; c < g.C; ++c)
      a.backward_constants(c, mean_p[c], 1.0 / std::sqrt(var_p[c] + eps), sg[c], sgc[c],
                           static_cast<double>(count), gamma);
    apply_backward<scalar_t>(gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                             dx.mutable_data_ptr<scalar_t>(), g, a);
  });
  return dx;
}

// ----------------------------------------------------------------------------------------------
// Autograd of train_forward.

// (dl/dx, dl/dγ, dl/dβ) in differentiable ATen ops with the statistics recomputed from x: the
// graph of the backward itself, for double backward. The same formula as composite_backward in
// functional/autograd.py, which serves the portable backend (this node cannot call Python);
// the gradgradcheck tests and test_gradient_penalty_runs_through_double_backward check both
// (every backend) against the reference.
std::tuple<Tensor, Tensor, Tensor> composite_backward(const Tensor& gy, const Tensor& x,
                                                      const Tensor& weight, double eps) {
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  const auto acc = at::isReducedFloatingType(x.scalar_type()) ? at::kFloat : x.scalar_type();
  Tensor xf = x.to(acc), gf = gy.to(acc);
  const double m = static_cast<double>(x.numel() / x.size(1));
  auto [var, mean] = at::var_mean(xf, dims, /*correction=*/0, /*keepdim=*/true);
  Tensor inv = at::rsqrt(var + eps);
  Tensor x_hat = (xf - mean) * inv;
  Tensor sum_g = gf.sum(dims, /*keepdim=*/true);
  Tensor sum_gx = (gf * x_hat).sum(dims, /*keepdim=*/true);
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = x.size(1);
  Tensor gamma = weight.defined() ? weight.to(acc).view(shape) : at::ones_like(inv);
  Tensor dx = gamma * inv / m * (gf * m - sum_g - x_hat * sum_gx);
  return {dx.to(x.scalar_type()), sum_gx.flatten(), sum_g.flatten()};
}

std::tuple<Tensor, Tensor, Tensor> call_train_forward(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    const std::optional<Tensor>& num_batches_tracked,
    const std::optional<Tensor>& nonfinite_count, std::optional<double> momentum, double eps,
    bool guard) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("batchnorm::train_forward", "")
                       .typed<decltype(train_forward_cpu)>();
  return op.call(input, weight, bias, running_mean, running_var, num_batches_tracked,
                 nonfinite_count, momentum, eps, guard);
}

std::tuple<Tensor, Tensor, Tensor> call_train_backward(const Tensor& grad_out,
                                                       const Tensor& input, const Tensor& mean,
                                                       const Tensor& var,
                                                       const std::optional<Tensor>& weight,
                                                       double eps, std::array<bool, 3> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("batchnorm::train_backward", "")
                       .typed<decltype(train_backward_cpu)>();
  return op.call(grad_out, input, mean, var, weight, eps, mask);
}

// The backward node of train_forward, written as a plain autograd Node rather than a
// torch::autograd::Function: the generic Function machinery (a context with a string-keyed map,
// output wrapping through hash sets, checks of every one of the ten inputs) cost a few
// microseconds per call, a sizeable share of a small layer's training step. Saved tensors are
// SavedVariables, so in-place changes after the forward are still caught, saved-tensor hooks
// still apply, and retain_graph=False frees them.
struct TrainBackward final : public torch::autograd::Node {
  torch::autograd::SavedVariable x_, w_, mean_, var_;
  double eps_ = 0.0;
  bool has_w_ = false;

  std::string name() const override { return "BatchNormTrainBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x_.reset_data();
    w_.reset_data();
    mean_.reset_data();
    var_.reset_data();
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    torch::autograd::variable_list out(3);
    const Tensor& gy = grads[0];
    if (!gy.defined()) return out;
    const Tensor x = x_.unpack(), mean = mean_.unpack(), var = var_.unpack();
    const Tensor w = has_w_ ? w_.unpack() : Tensor();
    // next edges 0, 1, 2: input, weight, bias (undefined edges for absent parameters)
    const bool need_x = task_should_compute_output(0);
    const bool need_w = has_w_ && task_should_compute_output(1);
    const bool need_b = task_should_compute_output(2);
    Tensor dx, dw, db;
    // create_graph=True, or forward-mode AD through the backward (e.g. a Hessian-vector product
    // by forward-over-reverse): a differentiable backward
    if (at::GradMode::is_enabled() || gy._fw_grad(0).defined() || x._fw_grad(0).defined() ||
        (has_w_ && w._fw_grad(0).defined())) {
      std::tie(dx, dw, db) = composite_backward(gy, x, w, eps_);
      if (need_w) dw = dw.to(w.scalar_type());
      if (need_b) db = db.to(has_w_ ? w.scalar_type() : db.scalar_type());
    } else {
      std::tie(dx, dw, db) = call_train_backward(
          gy, x, mean, var, has_w_ ? std::optional<Tensor>(w) : std::nullopt, eps_,
          {need_x, need_w, need_b});
    }
    if (need_x) out[0] = std::move(dx);
    if (need_w) out[1] = std::move(dw);
    if (need_b) out[2] = std::move(db);
    return out;
  }
};

// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd): the tangent of y when
// the input, γ or β carries one (level 0, as PyTorch's generated kernels; functorch maps its own
// levels onto it). With x̂ = (x - μ)·inv over the batch, inv = 1/sqrt(σ² + ε), and tangents ẋ,
// γ̇, β̇ (mean over the m values of each channel):
//   ẏ = γ·inv·(ẋ - mean(ẋ) - x̂·mean(ẋ·x̂)) + γ̇·x̂ + β̇
// in differentiable ATen ops on the primals, so forward-over-reverse and reverse-over-forward
// compose. Without this the dispatcher would drop the tangents silently.
void set_forward_tangent(const Tensor& y, const Tensor& input, const std::optional<Tensor>& weight,
                         const std::optional<Tensor>& bias, const Tensor& mean, const Tensor& var,
                         double eps) {
  auto tangent = [](const std::optional<Tensor>& t) {
    return t.has_value() && t->defined() ? t->_fw_grad(/*level=*/0) : Tensor();
  };
  const Tensor tx = input._fw_grad(/*level=*/0), tw = tangent(weight), tb = tangent(bias);
  if (!tx.defined() && !tw.defined() && !tb.defined()) return;
  std::vector<int64_t> dims{0}, shape(input.dim(), 1);
  for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
  shape[1] = input.size(1);
  const auto acc = at::isReducedFloatingType(input.scalar_type()) ? at::kFloat
                                                                   : input.scalar_type();
  const Tensor inv = at::rsqrt(var + eps).to(acc).view(shape);
  const Tensor x_hat = (input._fw_primal(0).to(acc) - mean.to(acc).view(shape)) * inv;
  Tensor ty;
  if (tx.defined()) {
    const Tensor t = tx.to(acc);
    ty = inv * (t - t.mean(dims, /*keepdim=*/true) -
                x_hat * (t * x_hat).mean(dims, /*keepdim=*/true));
    if (weight.has_value() && weight->defined())
      ty = ty * weight->_fw_primal(0).to(acc).view(shape);
  }
  if (tw.defined()) {
    const Tensor t = tw.to(acc).view(shape) * x_hat;
    ty = ty.defined() ? ty + t : t;
  }
  if (tb.defined()) {
    const Tensor t = tb.to(acc).view(shape);
    ty = ty.defined() ? ty + t : t.expand_as(x_hat);
  }
  y._set_fw_grad(ty.to(y.scalar_type()), /*level=*/0, /*is_inplace_op=*/false);
}

// The Autograd kernel of train_forward: the CPU kernel below autograd, and a TrainBackward node
// when a gradient is needed. mean and var are returned without a gradient.
std::tuple<Tensor, Tensor, Tensor> train_forward_autograd(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    const std::optional<Tensor>& num_batches_tracked,
    const std::optional<Tensor>& nonfinite_count, std::optional<double> momentum, double eps,
    bool guard) {
  const bool needs_grad = torch::autograd::compute_requires_grad(input, weight, bias);
  auto out = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    return call_train_forward(input, weight, bias, running_mean, running_var,
                              num_batches_tracked, nonfinite_count, momentum, eps, guard);
  }();
  set_forward_tangent(std::get<0>(out), input, weight, bias, std::get<1>(out), std::get<2>(out),
                      eps);
  if (needs_grad) {
    auto node = c10::make_intrusive<TrainBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias));
    const Tensor& y = std::get<0>(out);
    node->x_ = torch::autograd::SavedVariable(input, /*is_output=*/false);
    node->has_w_ = weight.has_value() && weight->defined();
    if (node->has_w_) node->w_ = torch::autograd::SavedVariable(*weight, /*is_output=*/false);
    node->mean_ = torch::autograd::SavedVariable(std::get<1>(out), /*is_output=*/false);
    node->var_ = torch::autograd::SavedVariable(std::get<2>(out), /*is_output=*/false);
    node->eps_ = eps;
    torch::autograd::set_history(y, node);
  }
  return out;
}

int64_t abi_version() { return 6; }

// Sets the streaming-store threshold in bytes (-1: never stream); returns the previous one.
int64_t set_stream_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= -1, "batchnorm: set_stream_bytes takes a byte count or -1, got ", bytes);
  return stream_threshold().exchange(bytes);
}

// Sets the size from which outputs are no longer streamed (-1: no limit); returns the previous.
int64_t set_stream_max_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= -1, "batchnorm: set_stream_max_bytes takes a byte count or -1, got ",
              bytes);
  return stream_limit().exchange(bytes);
}

}  // namespace

// Whether the kernels can run on `t`: a CPU tensor that is no tensor subclass. A tensor on
// another device among the arguments (e.g. a buffer left on `meta` by meta-device construction,
// with real parameters loaded by load_state_dict(assign=True)) would make the dispatcher run the
// op's fake kernel, which returns uninitialized memory; a __torch_dispatch__ subclass (DTensor,
// FSDP2 and functorch-style wrappers, torch's composite-compliance tensors) has no data of its
// own for the kernels to read.
bool fusable(const std::optional<Tensor>& t) {
  if (!t.has_value() || !t->defined()) return true;
  return t->device().is_cpu() && !t->key_set().has_any(c10::python_ks) && t->has_storage();
}

// The eager Python entry of train_forward: pybind11 costs about a microsecond per call where the
// generic torch.ops path costs several. Returns (y, mean, var, skipped): skipped is true when
// the guard refused to write this batch's statistics into the running buffers, so Python can
// warn without reading a counter on every step. Tracing (torch.compile, fx) uses the op instead.
// If any argument is not fusable (see above) nothing runs and y is undefined (None in Python):
// the caller then takes PyTorch's own path, which handles (or reports) such tensors as torch does.
std::tuple<Tensor, Tensor, Tensor, bool> train_forward_entry(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    const std::optional<Tensor>& num_batches_tracked,
    const std::optional<Tensor>& nonfinite_count, std::optional<double> momentum, double eps,
    bool guard) {
  if (!fusable(input) || !fusable(weight) || !fusable(bias) || !fusable(running_mean) ||
      !fusable(running_var) || !fusable(num_batches_tracked) || !fusable(nonfinite_count))
    return {Tensor(), Tensor(), Tensor(), false};
  auto [y, mean, var] = call_train_forward(input, weight, bias, running_mean, running_var,
                                           num_batches_tracked, nonfinite_count, momentum, eps,
                                           guard);
  bool skipped = false;
  if (guard && input.numel() > 0 &&
      ((running_mean.has_value() && running_mean->defined()) ||
       (running_var.has_value() && running_var->defined()))) {
    const double* mp = mean.const_data_ptr<double>();
    const double* vp = var.const_data_ptr<double>();
    for (int64_t c = 0; c < mean.numel() && !skipped; ++c)
      skipped = !(std::isfinite(mp[c]) && std::isfinite(vp[c]));
  }
  return {y, mean, var, skipped};
}

TORCH_LIBRARY(batchnorm, m) {
  m.def(
      "train_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, Tensor(d!)? nonfinite_count, "
      "float? momentum, float eps, bool guard) -> (Tensor, Tensor, Tensor)");
  m.def(
      "train_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor var, Tensor? weight, "
      "float eps, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("moments(Tensor input) -> (Tensor, Tensor)");
  m.def(
      "normalize(Tensor input, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) "
      "-> Tensor");
  m.def("backward_reduce(Tensor grad_out, Tensor input, Tensor mean) -> (Tensor, Tensor)");
  m.def(
      "backward_elementwise(Tensor grad_out, Tensor input, Tensor mean, Tensor var, "
      "Tensor? weight, Tensor sum_g, Tensor sum_gc, int count, float eps) -> Tensor");
  m.def("abi_version() -> int", &abi_version);
  m.def("set_stream_bytes(int bytes) -> int", &set_stream_bytes);
  m.def("set_stream_max_bytes(int bytes) -> int", &set_stream_max_bytes);
}

TORCH_LIBRARY_IMPL(batchnorm, CPU, m) {
  m.impl("train_forward", &train_forward_cpu);
  m.impl("train_backward", &train_backward_cpu);
  m.impl("moments", &moments_cpu);
  m.impl("normalize", &normalize_cpu);
  m.impl("backward_reduce", &backward_reduce_cpu);
  m.impl("backward_elementwise", &backward_elementwise_cpu);
}

TORCH_LIBRARY_IMPL(batchnorm, Autograd, m) { m.impl("train_forward", &train_forward_autograd); }

}  // namespace batchnorm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("train_forward", &batchnorm::train_forward_entry,
        "Training-mode BN forward with autograd: (y, mean, var, skipped)");
}
