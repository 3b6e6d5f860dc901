// Fused CPU kernels for training-mode Batch Normalization (Ioffe & Szegedy, arXiv:1502.03167).
//
// BN is memory-bound: the training forward must read x and write y, the backward must read x and
// dy and write dx. These kernels read each tensor once from memory and re-read it while it is
// still in cache where the layout allows:
//
//   * "planar" inputs (contiguous N, C, *spatial with spatial size S > 1): one task per channel
//     computes the channel's statistics and then normalizes it while its N·S values sit in L2;
//   * "rows" inputs (2-D (N, C), and channels_last / channels_last_3d): the reduction runs over
//     rows with per-channel accumulators, then an elementwise pass applies the result.
//
// Numerics (see also functional/stats.py):
//   * statistics are shifted sums accumulated in float64: d = x - x_0 per channel, Σd and Σd², so
//     Var = (Σd² - (Σd)²/m)/m does not cancel catastrophically for inputs like 1e4 + N(0, 1);
//   * every reduction is split into chunks whose boundaries depend only on the shape, and chunk
//     partials are added in a fixed order, so results do not depend on the number of threads;
//   * x - mean is computed as (x - mean_hi) - mean_lo, where mean_hi + mean_lo is the float64 mean
//     split into two floats: exact to float rounding even when |mean| >> std;
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
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
  _Float16 h;
  std::memcpy(&h, &v, 2);
  return static_cast<float>(h);
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
  if (S == 1 && x.is_contiguous()) return {{Layout::Rows, N, C, 1, N}, x};
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

// Chunks hold about this many values; chunk boundaries depend only on the shape.
constexpr int64_t kChunk = 16384;
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
  per = std::min(per, std::max<int64_t>(span, 1));
  return {per, (span + per - 1) / per};
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

// Per-channel constants of the elementwise passes, in the compute type (one allocation):
//   forward:  y  = ((x - mean_hi) - mean_lo) * k1 + k3                (k1 = γ·inv, k3 = β)
//   backward: dx = k1 * g - (k2 * ((x - mean_hi) - mean_lo) + k3)     (see backward_constants)
template <typename T>
struct ChannelAffine {
  using A = typename Compute<T>::type;
  explicit ChannelAffine(int64_t C) : storage(5 * C) {
    mean_hi = storage.data();
    mean_lo = mean_hi + C;
    k1 = mean_lo + C;
    k2 = k1 + C;
    k3 = k2 + C;
  }
  std::vector<A> storage;
  A *mean_hi, *mean_lo, *k1, *k2, *k3;

  void set_mean(int64_t c, double mean) {
    mean_hi[c] = static_cast<A>(mean);
    mean_lo[c] = static_cast<A>(mean - static_cast<double>(mean_hi[c]));
  }
  void forward_constants(int64_t c, double mean, double var, double eps, const ParamView& gamma,
                         const ParamView& beta) {
    const double inv = 1.0 / std::sqrt(var + eps);
    set_mean(c, mean);
    k1[c] = static_cast<A>(gamma ? gamma[c] * inv : inv);
    k3[c] = static_cast<A>(beta ? beta[c] : 0.0);
  }
  // dl/dx = γ·inv/m · (m g - Σg - x̂ Σg x̂) with x̂ = (x - mean)·inv and s2 = Σ g (x - mean)
  void backward_constants(int64_t c, double mean, double inv, double s1, double s2, double m,
                          const ParamView& gamma) {
    const double gm = gamma ? gamma[c] : 1.0;
    set_mean(c, mean);
    k1[c] = static_cast<A>(gm * inv);
    k2[c] = static_cast<A>(gm * inv * inv * inv * s2 / m);
    k3[c] = static_cast<A>(gm * inv * s1 / m);
  }
};

// ----------------------------------------------------------------------------------------------
// The reductions: the only loops that sum over data.

// Σd, Σd² over batch items [n0, n1) of channel c, d = x - shift.
template <typename T>
inline void planar_sums_x(const T* __restrict x, const Geometry& g, int64_t c, int64_t n0,
                          int64_t n1, double shift, double& out1, double& out2) {
  double a1 = 0.0, a2 = 0.0;
  for (int64_t n = n0; n < n1; ++n) {
    const T* __restrict p = x + (n * g.C + c) * g.S;
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t s = 0; s < g.S; ++s) {
      const double d = static_cast<double>(load(p[s])) - shift;
      a1 += d;
      a2 += d * d;
    }
  }
  out1 = a1;
  out2 = a2;
}

// Σg, Σg(x - mean) over batch items [n0, n1) of channel c.
template <typename T>
inline void planar_sums_g(const T* __restrict gy, const T* __restrict x, const Geometry& g,
                          int64_t c, int64_t n0, int64_t n1, typename Compute<T>::type mh,
                          typename Compute<T>::type ml, double& out1, double& out2) {
  using A = typename Compute<T>::type;
  double a1 = 0.0, a2 = 0.0;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t off = (n * g.C + c) * g.S;
    const T* __restrict pg = gy + off;
    const T* __restrict px = x + off;
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t s = 0; s < g.S; ++s) {
      const A gv = load(pg[s]);
      const A cx = (load(px[s]) - mh) - ml;
      a1 += static_cast<double>(gv);
      a2 += static_cast<double>(gv * cx);
    }
  }
  out1 = a1;
  out2 = a2;
}

// Per channel Σd, Σd² over rows [r0, r1), added into s1[C], s2[C].
template <typename T>
inline void rows_sums_x(const T* __restrict x, const Geometry& g, int64_t r0, int64_t r1,
                        const double* __restrict shift, double* __restrict s1,
                        double* __restrict s2) {
  const int64_t C = g.C;
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict p = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double d = static_cast<double>(load(p[c])) - shift[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

// Per channel Σg, Σg(x - mean) over rows [r0, r1), added into s1[C], s2[C].
template <typename T>
inline void rows_sums_g(const T* __restrict gy, const T* __restrict x, const Geometry& g,
                        int64_t r0, int64_t r1, const ChannelAffine<T>& a, double* __restrict s1,
                        double* __restrict s2) {
  using A = typename Compute<T>::type;
  const int64_t C = g.C;
  const A* __restrict mh = a.mean_hi;
  const A* __restrict ml = a.mean_lo;
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict pg = gy + r * C;
    const T* __restrict px = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A gv = load(pg[c]);
      const A cx = (load(px[c]) - mh[c]) - ml[c];
      s1[c] += static_cast<double>(gv);
      s2[c] += static_cast<double>(gv * cx);
    }
  }
}

// ----------------------------------------------------------------------------------------------
// The elementwise passes.

template <typename T>
inline void planar_forward(const T* __restrict x, T* __restrict y, const Geometry& g, int64_t c,
                           int64_t n0, int64_t n1, const ChannelAffine<T>& a) {
  using A = typename Compute<T>::type;
  const A mh = a.mean_hi[c], ml = a.mean_lo[c], k1 = a.k1[c], k3 = a.k3[c];
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t off = (n * g.C + c) * g.S;
    const T* __restrict p = x + off;
    T* __restrict q = y + off;
#pragma omp simd
    for (int64_t s = 0; s < g.S; ++s) store(q + s, ((load(p[s]) - mh) - ml) * k1 + k3);
  }
}

template <typename T>
inline void rows_forward(const T* __restrict x, T* __restrict y, const Geometry& g, int64_t r0,
                         int64_t r1, const ChannelAffine<T>& a) {
  using A = typename Compute<T>::type;
  const int64_t C = g.C;
  const A* __restrict mh = a.mean_hi;
  const A* __restrict ml = a.mean_lo;
  const A* __restrict k1 = a.k1;
  const A* __restrict k3 = a.k3;
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict p = x + r * C;
    T* __restrict q = y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) store(q + c, ((load(p[c]) - mh[c]) - ml[c]) * k1[c] + k3[c]);
  }
}

template <typename T>
inline void planar_backward(const T* __restrict gy, const T* __restrict x, T* __restrict dx,
                            const Geometry& g, int64_t c, int64_t n0, int64_t n1,
                            const ChannelAffine<T>& a) {
  using A = typename Compute<T>::type;
  const A mh = a.mean_hi[c], ml = a.mean_lo[c], k1 = a.k1[c], k2 = a.k2[c], k3 = a.k3[c];
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t off = (n * g.C + c) * g.S;
    const T* __restrict pg = gy + off;
    const T* __restrict px = x + off;
    T* __restrict q = dx + off;
#pragma omp simd
    for (int64_t s = 0; s < g.S; ++s) {
      const A cx = (load(px[s]) - mh) - ml;
      store(q + s, k1 * load(pg[s]) - (k2 * cx + k3));
    }
  }
}

template <typename T>
inline void rows_backward(const T* __restrict gy, const T* __restrict x, T* __restrict dx,
                          const Geometry& g, int64_t r0, int64_t r1, const ChannelAffine<T>& a) {
  using A = typename Compute<T>::type;
  const int64_t C = g.C;
  const A* __restrict mh = a.mean_hi;
  const A* __restrict ml = a.mean_lo;
  const A* __restrict k1 = a.k1;
  const A* __restrict k2 = a.k2;
  const A* __restrict k3 = a.k3;
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict pg = gy + r * C;
    const T* __restrict px = x + r * C;
    T* __restrict q = dx + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A cx = (load(px[c]) - mh[c]) - ml[c];
      store(q + c, k1[c] * load(pg[c]) - (k2[c] * cx + k3[c]));
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Drivers: a per-channel reduction, a per-channel finish, and optionally an elementwise pass.
//
// Planar: `sums(c, n0, n1, s1, s2)` reduces one chunk of channel c; `finish(c, s1, s2)` sees the
// chunk partials added in chunk order; `apply(c, n0, n1)` is the elementwise pass. With at least
// as many channels as threads, each channel's task runs sums, finish and apply back to back while
// the channel is in cache. Otherwise the chunks of all channels are reduced in parallel, finished,
// and the pass runs in parallel over chunks. Either way the same numbers are added in the same
// order, so results do not depend on the thread count.

template <typename Sums, typename Finish, typename Apply>
void planar_driver(const Geometry& g, const Sums& sums, const Finish& finish, const Apply& apply,
                   bool has_apply) {
  const Chunking ch = chunking(g);
  const int64_t C = g.C;
  auto chunk_range = [&](int64_t k, int64_t& n0, int64_t& n1) {
    n0 = k * ch.per;
    n1 = std::min(g.N, n0 + ch.per);
  };
  if (C >= at::get_num_threads() || g.total() < kSerialBelow) {
    parallel(C, g.total(), [&](int64_t c0, int64_t c1) {
      std::vector<double> part(2 * ch.count);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t k = 0; k < ch.count; ++k) {
          int64_t n0, n1;
          chunk_range(k, n0, n1);
          sums(c, n0, n1, part[2 * k], part[2 * k + 1]);
        }
        double s1 = 0.0, s2 = 0.0;
        for (int64_t k = 0; k < ch.count; ++k) {
          s1 += part[2 * k];
          s2 += part[2 * k + 1];
        }
        finish(c, s1, s2);
        if (has_apply) apply(c, int64_t{0}, g.N);
      }
    });
    return;
  }
  const int64_t items = C * ch.count;
  std::vector<double> part(2 * items);
  parallel(items, g.total(), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      int64_t n0, n1;
      chunk_range(i % ch.count, n0, n1);
      sums(i / ch.count, n0, n1, part[2 * i], part[2 * i + 1]);
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t k = 0; k < ch.count; ++k) {
      s1 += part[2 * (c * ch.count + k)];
      s2 += part[2 * (c * ch.count + k) + 1];
    }
    finish(c, s1, s2);
  }
  if (!has_apply) return;
  parallel(items, g.total(), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      int64_t n0, n1;
      chunk_range(i % ch.count, n0, n1);
      apply(i / ch.count, n0, n1);
    }
  });
}

// Rows: `sums(r0, r1, s1, s2)` adds one chunk of rows into per-channel arrays s1[C], s2[C];
// `finish(c, s1, s2)` sees the chunk partials added in chunk order; `apply(r0, r1)` is the pass.
template <typename Sums, typename Finish, typename Apply>
void rows_driver(const Geometry& g, const Sums& sums, const Finish& finish, const Apply& apply,
                 bool has_apply) {
  const Chunking ch = chunking(g);
  const int64_t C = g.C;
  std::vector<double> part(2 * ch.count * C, 0.0);
  parallel(ch.count, g.total(), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = k * ch.per, r1 = std::min(g.rows(), r0 + ch.per);
      sums(r0, r1, &part[2 * k * C], &part[(2 * k + 1) * C]);
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t k = 0; k < ch.count; ++k) {
      s1 += part[2 * k * C + c];
      s2 += part[(2 * k + 1) * C + c];
    }
    finish(c, s1, s2);
  }
  if (!has_apply) return;
  parallel(ch.count, g.total(), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = k * ch.per, r1 = std::min(g.rows(), r0 + ch.per);
      apply(r0, r1);
    }
  });
}

inline void finish_moments(double shift, double s1, double s2, double m, double& mean,
                           double& var) {
  mean = shift + s1 / m;
  const double v = (s2 - s1 * (s1 / m)) / m;  // Alg. 1: biased variance
  var = v < 0.0 ? 0.0 : v;  // clamp rounding below zero; a NaN stays NaN (std::max would drop it)
}

// ----------------------------------------------------------------------------------------------
// The kernels, per dtype.

// Statistics (Alg. 1: μ_B, biased σ²_B), and when `a` and `y` are given also y = BN(x).
template <typename T>
void forward_kernel(const T* x, T* y, const Geometry& g, double* mean, double* var,
                    ChannelAffine<T>* a, double eps, const ParamView& gamma,
                    const ParamView& beta) {
  const double m = static_cast<double>(g.m);
  const bool apply = y != nullptr;
  auto finish = [&](int64_t c, double s1, double s2, double shift) {
    finish_moments(shift, s1, s2, m, mean[c], var[c]);
    if (apply) a->forward_constants(c, mean[c], var[c], eps, gamma, beta);
  };
  if (g.layout == Layout::Planar) {
    planar_driver(
        g,
        [&](int64_t c, int64_t n0, int64_t n1, double& s1, double& s2) {
          planar_sums_x(x, g, c, n0, n1, static_cast<double>(load(x[c * g.S])), s1, s2);
        },
        [&](int64_t c, double s1, double s2) {
          finish(c, s1, s2, static_cast<double>(load(x[c * g.S])));
        },
        [&](int64_t c, int64_t n0, int64_t n1) { planar_forward(x, y, g, c, n0, n1, *a); }, apply);
  } else {
    std::vector<double> shift(g.C);
    for (int64_t c = 0; c < g.C; ++c) shift[c] = static_cast<double>(load(x[c]));
    rows_driver(
        g,
        [&](int64_t r0, int64_t r1, double* s1, double* s2) {
          rows_sums_x(x, g, r0, r1, shift.data(), s1, s2);
        },
        [&](int64_t c, double s1, double s2) { finish(c, s1, s2, shift[c]); },
        [&](int64_t r0, int64_t r1) { rows_forward(x, y, g, r0, r1, *a); }, apply);
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
// (the local backward). `a` holds the mean split and receives the backward constants.
template <typename T>
void backward_kernel(const T* gy, const T* x, T* dx, const Geometry& g, const double* mean,
                     const double* inv, ChannelAffine<T>& a, const ParamView& gamma,
                     double* sum_g, double* sum_gc) {
  const double m = static_cast<double>(g.m);
  const bool apply = dx != nullptr;
  for (int64_t c = 0; c < g.C; ++c) a.set_mean(c, mean[c]);
  auto finish = [&](int64_t c, double s1, double s2) {
    sum_g[c] = s1;
    sum_gc[c] = s2;
    if (apply) a.backward_constants(c, mean[c], inv[c], s1, s2, m, gamma);
  };
  if (g.layout == Layout::Planar) {
    planar_driver(
        g,
        [&](int64_t c, int64_t n0, int64_t n1, double& s1, double& s2) {
          planar_sums_g(gy, x, g, c, n0, n1, a.mean_hi[c], a.mean_lo[c], s1, s2);
        },
        finish,
        [&](int64_t c, int64_t n0, int64_t n1) { planar_backward(gy, x, dx, g, c, n0, n1, a); },
        apply);
  } else {
    rows_driver(
        g,
        [&](int64_t r0, int64_t r1, double* s1, double* s2) {
          rows_sums_g(gy, x, g, r0, r1, a, s1, s2);
        },
        finish, [&](int64_t r0, int64_t r1) { rows_backward(gy, x, dx, g, r0, r1, a); }, apply);
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
  auto update = [&](const Tensor& buf, const double* batch, double scale) {
    TORCH_CHECK(buf.numel() == C && buf.is_contiguous() && buf.device().is_cpu(),
                "batchnorm: running statistics must be contiguous CPU vectors of ", C,
                " values, got shape ", buf.sizes());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buf.scalar_type(), "bn_update", [&] {
      scalar_t* p = buf.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        const double old = static_cast<double>(p[c]);
        p[c] = static_cast<scalar_t>((1.0 - factor) * old + factor * batch[c] * scale);
      }
    });
    torch::autograd::impl::bump_version(buf);
  };
  if (has_mean) update(*running_mean, mean, 1.0);
  if (has_var) update(*running_var, var, bessel);  // running_var stores the unbiased variance
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
  TORCH_CHECK(g.m > 1, "Expected more than 1 value per channel when training, got input size ",
              input.sizes());
  TORCH_CHECK(eps > 0, "batchnorm: eps must be positive, got ", eps);
  const ParamView gamma = param_view(weight, g.C, "weight");
  const ParamView beta = param_view(bias, g.C, "bias");
  Tensor y = at::empty_like(x);
  auto opts = input.options().dtype(at::kDouble);
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
  for (int64_t c = 0; c < g.C; ++c) inv[c] = 1.0 / std::sqrt(var_p[c] + eps);
  Tensor dx = mask[0] ? at::empty_like(x) : Tensor();
  BN_DISPATCH(x.scalar_type(), "batchnorm_train_backward", [&] {
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
  Tensor dx = at::empty_like(x);
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
// graph of the backward itself, for double backward.
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

class TrainFunction : public torch::autograd::Function<TrainFunction> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const Tensor& input,
      const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
      const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
      const std::optional<Tensor>& num_batches_tracked,
      const std::optional<Tensor>& nonfinite_count, std::optional<double> momentum, double eps,
      bool guard) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [y, mean, var] = call_train_forward(input, weight, bias, running_mean, running_var,
                                             num_batches_tracked, nonfinite_count, momentum, eps,
                                             guard);
    ctx->save_for_backward({input, weight.has_value() ? *weight : Tensor(), mean, var});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({mean, var});
    return {y, mean, var};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &mean = saved[2], &var = saved[3];
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    torch::autograd::variable_list out(10);
    const Tensor& gy = grads[0];
    if (!gy.defined()) return out;
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = w.defined() && ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    Tensor dx, dw, db;
    if (at::GradMode::is_enabled()) {  // create_graph=True: a differentiable backward
      std::tie(dx, dw, db) = composite_backward(gy, x, w, eps);
      if (need_w) dw = dw.to(w.scalar_type());
      if (need_b) db = db.to(w.defined() ? w.scalar_type() : db.scalar_type());
    } else {
      std::tie(dx, dw, db) = call_train_backward(
          gy, x, mean, var, w.defined() ? std::optional<Tensor>(w) : std::nullopt, eps,
          {need_x, need_w, need_b});
    }
    out[0] = need_x ? dx : Tensor();
    out[1] = need_w ? dw : Tensor();
    out[2] = need_b ? db : Tensor();
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> train_forward_autograd(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    const std::optional<Tensor>& num_batches_tracked,
    const std::optional<Tensor>& nonfinite_count, std::optional<double> momentum, double eps,
    bool guard) {
  auto out = TrainFunction::apply(input, weight, bias, running_mean, running_var,
                                  num_batches_tracked, nonfinite_count, momentum, eps, guard);
  return {out[0], out[1], out[2]};
}

int64_t abi_version() { return 2; }

}  // namespace

// The eager Python entry of train_forward: pybind11 costs about a microsecond per call where the
// generic torch.ops path costs several. Returns (y, mean, var, first_skip): first_skip is true
// when this call moved nonfinite_count from 0, so Python can warn once without reading the
// counter on every step. Tracing (torch.compile, fx) uses the registered op instead.
std::tuple<Tensor, Tensor, Tensor, bool> train_forward_entry(
    const Tensor& input, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    const std::optional<Tensor>& num_batches_tracked,
    const std::optional<Tensor>& nonfinite_count, std::optional<double> momentum, double eps,
    bool guard) {
  const int64_t* counter = nullptr;
  if (nonfinite_count.has_value() && nonfinite_count->defined() &&
      nonfinite_count->device().is_cpu() && nonfinite_count->scalar_type() == at::kLong)
    counter = nonfinite_count->const_data_ptr<int64_t>();
  const int64_t before = counter ? *counter : 0;
  auto [y, mean, var] = call_train_forward(input, weight, bias, running_mean, running_var,
                                           num_batches_tracked, nonfinite_count, momentum, eps,
                                           guard);
  return {y, mean, var, counter != nullptr && before == 0 && *counter > 0};
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
        "Training-mode BN forward with autograd: (y, mean, var, first_skip)");
}
