// Fused CPU kernels for training-mode Batch Normalization (Ioffe & Szegedy, arXiv:1502.03167).
//
// BN is memory-bound: the training forward must read x and write y, the backward must read x and
// dy and write dx. PyTorch's CPU kernels make several passes over memory; these kernels make one
// pass from memory per tensor and re-read data while it is still in cache:
//
//   * "planar" inputs (contiguous N, C, *spatial with a spatial size > 1): one task per channel
//     computes the channel's statistics and then normalizes it while its N·S values sit in L2.
//   * "rows" inputs (2-D (N, C), and channels_last / channels_last_3d): the reduction runs over
//     rows with per-channel accumulators in vector lanes, then an elementwise pass normalizes.
//
// Numerics (see also functional/stats.py):
//   * statistics use shifted sums accumulated in float64: d = x - x_0 per channel, Σd and Σd², so
//     Var = (Σd² - (Σd)²/m)/m has no catastrophic cancellation for inputs like 1e4 + N(0, 1);
//   * the reduction is split into chunks whose boundaries depend only on the shape, and chunk
//     partials are added in a fixed order, so results do not depend on the number of threads;
//   * y = ((x - mean_hi) - mean_lo) * scale + beta, where mean_hi + mean_lo is the float64 mean
//     split into two floats: x - mean is exact to float rounding even when |mean| >> std;
//   * 16-bit inputs are computed in float32; batch statistics are returned in float64.
//
// The op `batchnorm::train_forward` also updates the running statistics (EMA or cumulative, in
// torch's convention) and refuses to write non-finite batch statistics into them (the guard).
// Its autograd kernel is C++ (no Python on the backward path); a double backward falls back to
// ATen ops that recompute the statistics, so the second derivative is exact.

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
#include <string>
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
  uint16_t bits;
  std::memcpy(&bits, &v, 2);
  _Float16 h;
  std::memcpy(&h, &bits, 2);
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
// Shapes and chunking.

enum class Layout { Planar, Rows };

struct Geometry {
  Layout layout;
  int64_t N, C, S;  // planar: x[n][c][s]; rows: x[r][c] with R = N * S rows
  int64_t m;        // values per channel, N * S
  int64_t rows() const { return N * S; }
};

// Chunks hold about this many values; chunk boundaries depend only on the shape.
constexpr int64_t kChunk = 16384;
// Below this many values in total a call runs on one thread: a parallel region costs more.
constexpr int64_t kSerialBelow = 32768;

struct Chunking {
  int64_t per_chunk;  // planar: batch items n per chunk; rows: rows per chunk
  int64_t count;
};

Chunking planar_chunks(const Geometry& g) {
  int64_t per = std::max<int64_t>(1, kChunk / std::max<int64_t>(g.S, 1));
  per = std::min(per, g.N);
  return {per, (g.N + per - 1) / per};
}

Chunking row_chunks(const Geometry& g) {
  int64_t per = std::max<int64_t>(1, kChunk / std::max<int64_t>(g.C, 1));
  per = std::min(per, g.rows());
  return {per, (g.rows() + per - 1) / per};
}

template <typename F>
void parallel(int64_t n, int64_t total_values, const F& f) {
  if (total_values < kSerialBelow || n <= 1 || at::get_num_threads() == 1) {
    f(0, n);
  } else {
    at::parallel_for(0, n, 1, f);
  }
}

// Per-channel constants of the elementwise passes, in the compute type (one allocation).
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
};

// A read-only view of an optional per-channel parameter (γ or β) in any floating dtype, read
// as double without an ATen conversion (this runs on every call).
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

// Split a double into hi + lo in the compute type: hi + lo == v to about twice the precision.
template <typename A>
inline void split(double v, A& hi, A& lo) {
  hi = static_cast<A>(v);
  lo = static_cast<A>(v - static_cast<double>(hi));
}

// ----------------------------------------------------------------------------------------------
// Forward statistics.

// Σd, Σd² over batch items [n0, n1) of channel c, d = x - shift.
template <typename T>
inline void planar_chunk_sums(const T* __restrict x, const Geometry& g, int64_t c, int64_t n0,
                              int64_t n1, double shift, double& out1, double& out2) {
  double a1 = 0.0, a2 = 0.0;
  for (int64_t n = n0; n < n1; ++n) {
    const T* __restrict p = x + (n * g.C + c) * g.S;
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t s = 0; s < g.S; ++s) {
      double d = static_cast<double>(load(p[s])) - shift;
      a1 += d;
      a2 += d * d;
    }
  }
  out1 = a1;
  out2 = a2;
}

// Σd, Σd² per channel over rows [r0, r1), accumulated into s1[C], s2[C].
template <typename T>
inline void row_chunk_sums(const T* __restrict x, const Geometry& g, int64_t r0, int64_t r1,
                           const double* __restrict shift, double* __restrict s1,
                           double* __restrict s2) {
  const int64_t C = g.C;
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict p = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      double d = static_cast<double>(load(p[c])) - shift[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

inline void finish_moments(double shift, double s1, double s2, double m, double& mean,
                           double& var) {
  mean = shift + s1 / m;
  const double v = (s2 - s1 * (s1 / m)) / m;  // Alg. 1: biased variance
  var = v < 0.0 ? 0.0 : v;  // clamp rounding below zero; a NaN stays NaN (std::max would drop it)
}

// ----------------------------------------------------------------------------------------------
// Forward elementwise pass: y = ((x - mean_hi) - mean_lo) * scale + beta  (k1 = scale, k3 = beta)

template <typename T>
inline void planar_normalize(const T* __restrict x, T* __restrict y, const Geometry& g, int64_t c,
                             int64_t n0, int64_t n1, const ChannelAffine<T>& a) {
  using A = typename Compute<T>::type;
  const A mh = a.mean_hi[c], ml = a.mean_lo[c], sc = a.k1[c], b = a.k3[c];
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t off = (n * g.C + c) * g.S;
    const T* __restrict p = x + off;
    T* __restrict q = y + off;
#pragma omp simd
    for (int64_t s = 0; s < g.S; ++s) {
      A v = load(p[s]);
      store(q + s, ((v - mh) - ml) * sc + b);
    }
  }
}

template <typename T>
inline void rows_normalize(const T* __restrict x, T* __restrict y, const Geometry& g, int64_t r0,
                           int64_t r1, const ChannelAffine<T>& a) {
  using A = typename Compute<T>::type;
  const int64_t C = g.C;
  const A* __restrict mh = a.mean_hi;
  const A* __restrict ml = a.mean_lo;
  const A* __restrict sc = a.k1;
  const A* __restrict b = a.k3;
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict p = x + r * C;
    T* __restrict q = y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      A v = load(p[c]);
      store(q + c, ((v - mh[c]) - ml[c]) * sc[c] + b[c]);
    }
  }
}

// Per-channel affine of the forward from the statistics and (optional) gamma, beta.
template <typename T>
void forward_affine(ChannelAffine<T>& a, int64_t c, double mean, double var, double eps,
                    const ParamView& gamma, const ParamView& beta) {
  using A = typename Compute<T>::type;
  const double inv = 1.0 / std::sqrt(var + eps);
  split<A>(mean, a.mean_hi[c], a.mean_lo[c]);
  a.k1[c] = static_cast<A>(gamma ? gamma[c] * inv : inv);
  a.k3[c] = static_cast<A>(beta ? beta[c] : 0.0);
}

template <typename T>
void forward_kernel(const Tensor& x_t, Tensor& y_t, const Geometry& g, double eps,
                    const ParamView& gp, const ParamView& bp, double* mean_out, double* var_out) {
  const T* x = x_t.const_data_ptr<T>();
  T* y = y_t.mutable_data_ptr<T>();
  const int64_t C = g.C;
  const double m = static_cast<double>(g.m);
  ChannelAffine<T> a(C);
  const int64_t total = g.m * C;

  if (g.layout == Layout::Planar) {
    const Chunking ch = planar_chunks(g);
    auto channel_stats = [&](int64_t c, double* part1, double* part2) {
      const double shift = static_cast<double>(load(x[c * g.S]));
      for (int64_t k = 0; k < ch.count; ++k) {
        const int64_t n0 = k * ch.per_chunk, n1 = std::min(g.N, n0 + ch.per_chunk);
        planar_chunk_sums(x, g, c, n0, n1, shift, part1[k], part2[k]);
      }
      double s1 = 0.0, s2 = 0.0;
      for (int64_t k = 0; k < ch.count; ++k) {
        s1 += part1[k];
        s2 += part2[k];
      }
      finish_moments(shift, s1, s2, m, mean_out[c], var_out[c]);
      forward_affine(a, c, mean_out[c], var_out[c], eps, gp, bp);
    };
    if (C >= at::get_num_threads() || total < kSerialBelow) {
      // One task per channel: statistics, then normalization while the channel is in cache.
      parallel(C, total, [&](int64_t c0, int64_t c1) {
        std::vector<double> p1(ch.count), p2(ch.count);
        for (int64_t c = c0; c < c1; ++c) {
          channel_stats(c, p1.data(), p2.data());
          planar_normalize(x, y, g, c, 0, g.N, a);
        }
      });
    } else {
      // Few channels, many threads: split each channel's reduction over chunks. The chunk
      // partials are the same numbers the per-channel path computes, added in the same order.
      std::vector<double> p1(C * ch.count), p2(C * ch.count);
      parallel(C * ch.count, total, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t c = i / ch.count, k = i % ch.count;
          const int64_t n0 = k * ch.per_chunk, n1 = std::min(g.N, n0 + ch.per_chunk);
          const double shift = static_cast<double>(load(x[c * g.S]));
          planar_chunk_sums(x, g, c, n0, n1, shift, p1[i], p2[i]);
        }
      });
      for (int64_t c = 0; c < C; ++c) {
        const double shift = static_cast<double>(load(x[c * g.S]));
        double s1 = 0.0, s2 = 0.0;
        for (int64_t k = 0; k < ch.count; ++k) {
          s1 += p1[c * ch.count + k];
          s2 += p2[c * ch.count + k];
        }
        finish_moments(shift, s1, s2, m, mean_out[c], var_out[c]);
        forward_affine(a, c, mean_out[c], var_out[c], eps, gp, bp);
      }
      parallel(C * ch.count, total, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t c = i / ch.count, k = i % ch.count;
          const int64_t n0 = k * ch.per_chunk, n1 = std::min(g.N, n0 + ch.per_chunk);
          planar_normalize(x, y, g, c, n0, n1, a);
        }
      });
    }
  } else {
    const Chunking ch = row_chunks(g);
    std::vector<double> buf((2 * ch.count + 1) * C, 0.0);
    double* shift = buf.data();
    double* p1 = shift + C;
    double* p2 = p1 + ch.count * C;
    for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<double>(load(x[c]));
    parallel(ch.count, total, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * ch.per_chunk, r1 = std::min(g.rows(), r0 + ch.per_chunk);
        row_chunk_sums(x, g, r0, r1, shift, &p1[k * C], &p2[k * C]);
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t k = 0; k < ch.count; ++k) {
        s1 += p1[k * C + c];
        s2 += p2[k * C + c];
      }
      finish_moments(shift[c], s1, s2, m, mean_out[c], var_out[c]);
      forward_affine(a, c, mean_out[c], var_out[c], eps, gp, bp);
    }
    parallel(ch.count, total, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * ch.per_chunk, r1 = std::min(g.rows(), r0 + ch.per_chunk);
        rows_normalize(x, y, g, r0, r1, a);
      }
    });
  }
}

// ----------------------------------------------------------------------------------------------
// Backward:  dx = k1 * g - (k2 * (x - mean) + k3),  k1 = γ·inv,  k2 = γ·inv³·Σg(x-mean)/m,
//            k3 = γ·inv·Σg/m;   dγ = inv · Σ g (x - mean),  dβ = Σ g.

template <typename T>
inline void planar_grad_sums(const T* __restrict gy, const T* __restrict x, const Geometry& g,
                             int64_t c, int64_t n0, int64_t n1, double& out1, double& out2,
                             typename Compute<T>::type mh,
                             typename Compute<T>::type ml) {
  using A = typename Compute<T>::type;
  double a1 = 0.0, a2 = 0.0;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t off = (n * g.C + c) * g.S;
    const T* __restrict pg = gy + off;
    const T* __restrict px = x + off;
#pragma omp simd reduction(+ : a1, a2)
    for (int64_t s = 0; s < g.S; ++s) {
      A gv = load(pg[s]);
      A cx = (load(px[s]) - mh) - ml;
      a1 += static_cast<double>(gv);
      a2 += static_cast<double>(gv * cx);
    }
  }
  out1 = a1;
  out2 = a2;
}

template <typename T>
inline void row_grad_sums(const T* __restrict gy, const T* __restrict x, const Geometry& g,
                          int64_t r0, int64_t r1, const ChannelAffine<T>& a,
                          double* __restrict s1, double* __restrict s2) {
  using A = typename Compute<T>::type;
  const int64_t C = g.C;
  const A* __restrict mh = a.mean_hi;
  const A* __restrict ml = a.mean_lo;
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict pg = gy + r * C;
    const T* __restrict px = x + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      A gv = load(pg[c]);
      A cx = (load(px[c]) - mh[c]) - ml[c];
      s1[c] += static_cast<double>(gv);
      s2[c] += static_cast<double>(gv * cx);
    }
  }
}

template <typename T>
inline void planar_grad_input(const T* __restrict gy, const T* __restrict x, T* __restrict dx,
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
      A cx = (load(px[s]) - mh) - ml;
      store(q + s, k1 * load(pg[s]) - (k2 * cx + k3));
    }
  }
}

template <typename T>
inline void rows_grad_input(const T* __restrict gy, const T* __restrict x, T* __restrict dx,
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
      A cx = (load(px[c]) - mh[c]) - ml[c];
      store(q + c, k1[c] * load(pg[c]) - (k2[c] * cx + k3[c]));
    }
  }
}

template <typename T>
void backward_affine(ChannelAffine<T>& a, int64_t c, double inv, double s1, double s2, double m,
                     const ParamView& gamma) {
  using A = typename Compute<T>::type;
  const double gm = gamma ? gamma[c] : 1.0;
  a.k1[c] = static_cast<A>(gm * inv);
  a.k2[c] = static_cast<A>(gm * inv * inv * inv * s2 / m);
  a.k3[c] = static_cast<A>(gm * inv * s1 / m);
}

template <typename T>
void backward_kernel(const Tensor& gy_t, const Tensor& x_t, Tensor* dx_t, const Geometry& g,
                     const double* mean, const double* inv, const ParamView& gp, double* sum_g,
                     double* sum_gc) {
  const T* gy = gy_t.const_data_ptr<T>();
  const T* x = x_t.const_data_ptr<T>();
  T* dx = dx_t ? dx_t->mutable_data_ptr<T>() : nullptr;
  const int64_t C = g.C;
  const double m = static_cast<double>(g.m);
  ChannelAffine<T> a(C);
  for (int64_t c = 0; c < C; ++c) split(mean[c], a.mean_hi[c], a.mean_lo[c]);
  const int64_t total = g.m * C;

  if (g.layout == Layout::Planar) {
    const Chunking ch = planar_chunks(g);
    auto chunk_sums = [&](int64_t c, int64_t k, double& o1, double& o2) {
      const int64_t n0 = k * ch.per_chunk, n1 = std::min(g.N, n0 + ch.per_chunk);
      planar_grad_sums(gy, x, g, c, n0, n1, o1, o2, a.mean_hi[c], a.mean_lo[c]);
    };
    if (C >= at::get_num_threads() || total < kSerialBelow) {
      parallel(C, total, [&](int64_t c0, int64_t c1) {
        std::vector<double> p1(ch.count), p2(ch.count);
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t k = 0; k < ch.count; ++k) chunk_sums(c, k, p1[k], p2[k]);
          double s1 = 0.0, s2 = 0.0;
          for (int64_t k = 0; k < ch.count; ++k) {
            s1 += p1[k];
            s2 += p2[k];
          }
          sum_g[c] = s1;
          sum_gc[c] = s2;
          backward_affine(a, c, inv[c], s1, s2, m, gp);
          if (dx) planar_grad_input(gy, x, dx, g, c, 0, g.N, a);
        }
      });
    } else {
      std::vector<double> p1(C * ch.count), p2(C * ch.count);
      parallel(C * ch.count, total, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) chunk_sums(i / ch.count, i % ch.count, p1[i], p2[i]);
      });
      for (int64_t c = 0; c < C; ++c) {
        double s1 = 0.0, s2 = 0.0;
        for (int64_t k = 0; k < ch.count; ++k) {
          s1 += p1[c * ch.count + k];
          s2 += p2[c * ch.count + k];
        }
        sum_g[c] = s1;
        sum_gc[c] = s2;
        backward_affine(a, c, inv[c], s1, s2, m, gp);
      }
      if (dx) {
        parallel(C * ch.count, total, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t c = i / ch.count, k = i % ch.count;
            const int64_t n0 = k * ch.per_chunk, n1 = std::min(g.N, n0 + ch.per_chunk);
            planar_grad_input(gy, x, dx, g, c, n0, n1, a);
          }
        });
      }
    }
  } else {
    const Chunking ch = row_chunks(g);
    std::vector<double> buf(2 * ch.count * C, 0.0);
    double* p1 = buf.data();
    double* p2 = p1 + ch.count * C;
    parallel(ch.count, total, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r0 = k * ch.per_chunk, r1 = std::min(g.rows(), r0 + ch.per_chunk);
        row_grad_sums(gy, x, g, r0, r1, a, &p1[k * C], &p2[k * C]);
      }
    });
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t k = 0; k < ch.count; ++k) {
        s1 += p1[k * C + c];
        s2 += p2[k * C + c];
      }
      sum_g[c] = s1;
      sum_gc[c] = s2;
      backward_affine(a, c, inv[c], s1, s2, m, gp);
    }
    if (dx) {
      parallel(ch.count, total, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t r0 = k * ch.per_chunk, r1 = std::min(g.rows(), r0 + ch.per_chunk);
          rows_grad_input(gy, x, dx, g, r0, r1, a);
        }
      });
    }
  }
}

// ----------------------------------------------------------------------------------------------
// Layout detection.

// Returns the geometry and the tensor to read (x itself unless it had to be made contiguous).
std::pair<Geometry, Tensor> geometry_of(const Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "batchnorm: expected an input of shape (N, C, ...), got ", x.sizes());
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

#define BN_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ----------------------------------------------------------------------------------------------
// Running statistics: torch's update rule, refusing non-finite batch statistics.

// Adds one to a 0-dim int64 CPU counter in place; returns its old value. (No ATen op: this runs
// on every training step and a dispatch costs more than the arithmetic.)
int64_t bump(const Tensor& counter) {
  TORCH_CHECK(counter.numel() == 1 && counter.scalar_type() == at::kLong && counter.device().is_cpu(),
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
    for (int64_t c = 0; c < C && finite; ++c) finite = std::isfinite(mean[c]) && std::isfinite(var[c]);
    if (!finite) {
      // The caller (Python) sees the counter move and warns; C++ warnings do not reach Python's
      // `warnings` through torch.ops.
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
// The CPU kernels of the ops.

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
    forward_kernel<scalar_t>(x, y, g, eps, gamma, beta, mean.data_ptr<double>(),
                             var.data_ptr<double>());
  });
  update_running_stats(mean.data_ptr<double>(), var.data_ptr<double>(), g.C, g.m, running_mean,
                       running_var, num_batches_tracked, nonfinite_count, momentum, guard);
  return {y, mean, var};
}

// A per-channel float64 vector as a raw pointer, converting only if it is not one already.
const double* as_double_vector(const Tensor& t, int64_t C, Tensor& holder, const char* what) {
  TORCH_CHECK(t.numel() == C, "batchnorm: expected ", what, " to have ", C, " values, got shape ",
              t.sizes());
  holder = (t.scalar_type() == at::kDouble && t.is_contiguous()) ? t : t.to(at::kDouble).contiguous();
  return holder.const_data_ptr<double>();
}

// Writes v[c] (double) into a new per-channel tensor of the given dtype.
Tensor per_channel_tensor(const std::vector<double>& v, const at::TensorOptions& opts) {
  Tensor out = at::empty({static_cast<int64_t>(v.size())}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "bn_param_grad", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (size_t c = 0; c < v.size(); ++c) p[c] = static_cast<scalar_t>(v[c]);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> train_backward_cpu(const Tensor& grad_out,
                                                      const Tensor& input, const Tensor& mean,
                                                      const Tensor& var,
                                                      const std::optional<Tensor>& weight,
                                                      double eps, std::array<bool, 3> mask) {
  auto [g, x] = geometry_of(input);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "batchnorm: grad_output has shape ",
              grad_out.sizes(), " but the input had shape ", input.sizes());
  // Read the gradient in the same layout and dtype as x (no copy when it already is).
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
  if (g.layout == Layout::Rows && g.S > 1)
    fmt = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  Tensor gy = grad_out.scalar_type() == x.scalar_type() ? grad_out : grad_out.to(x.scalar_type());
  if (!gy.is_contiguous(fmt)) gy = gy.contiguous(fmt);
  const ParamView gamma = param_view(weight, g.C, "weight");
  Tensor mean_holder, var_holder;
  const double* mean_p = as_double_vector(mean, g.C, mean_holder, "mean");
  const double* var_p = as_double_vector(var, g.C, var_holder, "var");
  std::vector<double> inv(g.C), sum_g(g.C), sum_gc(g.C);
  for (int64_t c = 0; c < g.C; ++c) inv[c] = 1.0 / std::sqrt(var_p[c] + eps);
  Tensor dx = mask[0] ? at::empty_like(x) : Tensor();
  BN_DISPATCH(x.scalar_type(), "batchnorm_train_backward", [&] {
    backward_kernel<scalar_t>(gy, x, mask[0] ? &dx : nullptr, g, mean_p, inv.data(), gamma,
                              sum_g.data(), sum_gc.data());
  });
  Tensor dw, db;
  const auto param_opts =
      input.options().dtype(gamma ? gamma.type : input.scalar_type());
  if (mask[1]) {
    for (int64_t c = 0; c < g.C; ++c) sum_gc[c] *= inv[c];  // dl/dgamma = Σ g x̂
    dw = per_channel_tensor(sum_gc, param_opts);
  }
  if (mask[2]) db = per_channel_tensor(sum_g, param_opts);  // dl/dbeta = Σ g
  return {dx, dw, db};
}

// ----------------------------------------------------------------------------------------------
// Autograd.

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
    Tensor w = weight.has_value() ? *weight : Tensor();
    ctx->save_for_backward({input, w, mean, var});
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
    Tensor gy = grads[0];
    torch::autograd::variable_list out(11);
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
      std::tie(dx, dw, db) = call_train_backward(gy, x, mean, var,
                                                 w.defined() ? std::optional<Tensor>(w)
                                                             : std::nullopt,
                                                 eps, {need_x, need_w, need_b});
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

int64_t abi_version() { return 1; }

}  // namespace

// Returns (y, mean, var, first_skip): first_skip is true when this call moved nonfinite_count
// from 0, so the caller can warn once without reading the counter on every step.
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
  m.def("abi_version() -> int", &abi_version);
}

TORCH_LIBRARY_IMPL(batchnorm, CPU, m) {
  m.impl("train_forward", &train_forward_cpu);
  m.impl("train_backward", &train_backward_cpu);
}

TORCH_LIBRARY_IMPL(batchnorm, Autograd, m) {
  m.impl("train_forward", &train_forward_autograd);
}

}  // namespace batchnorm

// A direct Python entry for eager mode: pybind11 costs about a microsecond per call where the
// generic torch.ops path costs several. Tracing (torch.compile, fx) uses the registered op.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("train_forward", &batchnorm::train_forward_entry,
        "Training-mode BN forward with autograd (same arguments as batchnorm::train_forward)");
}
