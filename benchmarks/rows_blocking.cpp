// Why the rows layout's kernels make two sequential passes (issue #3): a standalone timing of
// the forward's memory traffic on a 4096 x 1024 float32 input (16 MiB, the benchmark's 2-D
// shape), one thread, AVX-512. Not built by the project; compile and run by hand:
//
//     g++ -O3 -march=native -o /tmp/rows_blocking benchmarks/rows_blocking.cpp && /tmp/rows_blocking
//
// A channel's statistics need every row before any of its outputs can be written, so when x
// does not fit in cache the forward reads it twice. The alternative is to block channels: take B
// channels of all rows (B = 64: 1 MiB, inside a 2 MiB L2), reduce them, then normalize them
// while they are in L2. Each variant below computes a stand-in for the forward (y = x - Σx per
// channel): the arithmetic is trivial, only the memory traffic is measured. Best of 30 calls.
//
// The variants are written with AVX-512 intrinsics. Without AVX-512 (e.g. AMD EPYC before Zen 4,
// or -march=x86-64-v3) the program still compiles and says that it measured nothing.
#include <cstdio>

#if defined(__AVX512F__)
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr long R = 4096, C = 1024;
float* x;
float* y;
float* pack;  // B x R contiguous values of one channel block

// one sequential read of x
float read_all() {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (long i = 0; i < R * C; i += 64) {
    a0 += _mm512_load_ps(x + i);
    a1 += _mm512_load_ps(x + i + 16);
    a2 += _mm512_load_ps(x + i + 32);
    a3 += _mm512_load_ps(x + i + 48);
  }
  return _mm512_reduce_add_ps(a0 + a1 + a2 + a3);
}

// read x, write y with ordinary stores (the benchmark's copy baseline)
void copy() {
  for (long i = 0; i < R * C; i += 16) _mm512_store_ps(y + i, _mm512_load_ps(x + i));
}

// what the kernels do: a sequential reduction pass, then a sequential pass writing y (streaming)
void two_pass() {
  std::vector<float> s(C, 0.f);
  for (long r = 0; r < R; ++r)
    for (long c = 0; c < C; c += 16)
      _mm512_storeu_ps(&s[c], _mm512_loadu_ps(&s[c]) + _mm512_load_ps(x + r * C + c));
  for (long r = 0; r < R; ++r)
    for (long c = 0; c < C; c += 16)
      _mm512_stream_ps(y + r * C + c, _mm512_load_ps(x + r * C + c) - _mm512_loadu_ps(&s[c]));
  _mm_sfence();
}

// Channel blocks of B: reduce the block over all rows (its B·4-byte slices of each 4 KiB row,
// optionally prefetched `ahead` rows early); then Second = 0: nothing more, 1: re-read the slices
// (no write), 2: re-read them and stream y.
template <int B, bool Prefetch, int Second>
float blocked(int ahead) {
  float total = 0;
  for (long c0 = 0; c0 < C; c0 += B) {
    __m512 acc[B / 16];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (long r = 0; r < R; ++r) {
      const float* p = x + r * C + c0;
      if (Prefetch)
        for (int j = 0; j < B; j += 16)
          _mm_prefetch(reinterpret_cast<const char*>(p + ahead * C + j), _MM_HINT_T0);
      for (int j = 0; j < B / 16; ++j) acc[j] += _mm512_load_ps(p + 16 * j);
    }
    __m512 reread = _mm512_setzero_ps();
    for (long r = 0; r < (Second > 0 ? R : 0); ++r) {
      const float* p = x + r * C + c0;
      for (int j = 0; j < B / 16; ++j) {
        const __m512 v = _mm512_load_ps(p + 16 * j) - acc[j];
        if (Second == 2)
          _mm512_stream_ps(y + r * C + c0 + 16 * j, v);
        else
          reread += v;
      }
    }
    if (Second == 2) _mm_sfence();
    for (auto& a : acc) total += _mm512_reduce_add_ps(a);
    total += _mm512_reduce_add_ps(reread);
  }
  return total;
}

// Channel blocks of B, packed: the reduction also copies the block into a contiguous buffer
// (no cache-set conflicts), and the second pass reads the buffer.
template <int B>
float packed() {
  float total = 0;
  for (long c0 = 0; c0 < C; c0 += B) {
    __m512 acc[B / 16];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (long r = 0; r < R; ++r) {
      const float* p = x + r * C + c0;
      for (int j = 0; j < B / 16; ++j) {
        const __m512 v = _mm512_load_ps(p + 16 * j);
        acc[j] += v;
        _mm512_store_ps(pack + r * B + 16 * j, v);
      }
    }
    for (long r = 0; r < R; ++r)
      for (int j = 0; j < B / 16; ++j)
        _mm512_stream_ps(y + r * C + c0 + 16 * j, _mm512_load_ps(pack + r * B + 16 * j) - acc[j]);
    _mm_sfence();
    for (auto& a : acc) total += _mm512_reduce_add_ps(a);
  }
  return total;
}

template <typename F>
double best_ms(F f) {
  double best = 1e9;
  for (int k = 0; k < 30; ++k) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best * 1e3;
}

}  // namespace

int main() {
  x = static_cast<float*>(std::aligned_alloc(64, R * C * sizeof(float)));
  y = static_cast<float*>(std::aligned_alloc(64, R * C * sizeof(float)));
  pack = static_cast<float*>(std::aligned_alloc(64, R * 128 * sizeof(float)));
  for (long i = 0; i < R * C; ++i) x[i] = static_cast<float>(i % 7);
  std::memset(y, 0, R * C * sizeof(float));
  volatile float sink;
  std::printf("one sequential read of x            %.3f ms\n", best_ms([&] { sink = read_all(); }));
  std::printf("copy x -> y                         %.3f ms\n", best_ms(copy));
  std::printf("two sequential passes (the kernels) %.3f ms\n", best_ms(two_pass));
  std::printf("blocked B=64: reduce only, no prefetch / prefetch 8 rows ahead  %.3f / %.3f ms\n",
              best_ms([&] { sink = blocked<64, false, 0>(0); }),
              best_ms([&] { sink = blocked<64, true, 0>(8); }));
  std::printf("blocked B=64 / 128: reduce + re-read, no write     %.3f / %.3f ms\n",
              best_ms([&] { sink = blocked<64, false, 1>(0); }),
              best_ms([&] { sink = blocked<128, false, 1>(0); }));
  std::printf("blocked B=64 / 128: reduce + re-read + stream y    %.3f / %.3f ms\n",
              best_ms([&] { sink = blocked<64, false, 2>(0); }),
              best_ms([&] { sink = blocked<128, false, 2>(0); }));
  std::printf("packed  B=64 / 128: reduce + pack, stream y        %.3f / %.3f ms\n",
              best_ms([&] { sink = packed<64>(); }), best_ms([&] { sink = packed<128>(); }));
  (void)sink;
}

#else  // no AVX-512

int main() {
  std::printf("rows_blocking: built without AVX-512 (__AVX512F__ undefined); these timings use "
              "AVX-512 intrinsics, so nothing was measured. Build with -march=native on an "
              "AVX-512 machine.\n");
  return 0;
}

#endif
