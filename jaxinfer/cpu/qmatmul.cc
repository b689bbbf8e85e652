// Quantized matmul on GGUF block rows: XLA FFI handler for the CPU path of jaxinfer.layers.quant.
//
// Target (wrapped by jaxinfer/layers/quant.py; contract: quant.qmatmul_reference):
//   jaxinfer_qmatmul(x [M, K] f32, w [N, K / 32 * B] u8) -> y [M, N] f32, y = x @ dequantize(w).T
//   attributes (i32): qtype (GGML type id: 2 Q4_0, 3 Q4_1, 8 Q8_0), activations (0: each 32-block
//   of x rounded to int8, d = max|x| / 127, as llama.cpp does; 1: float32, exact weight-only),
//   isa (0 auto, 1 scalar, 2 avx2, 3 avx512), num_threads (0: XLA's intra-op pool, adaptively;
//   n: n threads at most).
// Weight rows are read where they lie, in the GGUF layout: Q4_0 blocks are {f16 d, u8 qs[16]}
// (x = (q - 8) d), Q4_1 {f16 d, f16 m, u8 qs[16]} (x = q d + m), Q8_0 {f16 d, i8 qs[32]} (x = q d);
// low nibbles hold elements 0..15 of a block, high nibbles 16..31.
//
// int8 path. x is quantized once per call into a small buffer laid out for the ISA. Each output is
// the sum over blocks of d_w d_a isum (+ m_w d_a sum(q_a) for Q4_1), isum being the exact int32 dot
// of the block's quants; Q4_0's -8 and Q8_0's +128 offsets come back through sum(q_a).
// - avx512 (F, BW, VL, DQ, VNNI): a step covers a group of 4 blocks, one 128-bit lane per block:
//   vpermt2d/vpermt2w gather the group's weight quants (elements 0..15 of each block in one zmm,
//   16..31 in another); vpdpbusd multiplies u8 weights by s8 activations (Q8_0 weights are made
//   unsigned by xor 0x80, the accumulator starts at -128 sum(q_a)).
// - avx2 (+FMA, F16C): groups of 2 blocks, one ymm lane per Q4 block; vpmaddubsw + vpmaddwd (Q8_0:
//   llama.cpp's sign trick, one block per ymm).
// - scalar: portable C++, the baseline the SIMD paths are tested against.
// The activation buffer holds per group the quants in the weights' lane order and the scales spread
// over each block's lanes, so every per-block term is one vector op. M = 1: one weight row at a
// time streams against the activation row, which stays in L1 (measured here: 1 row beats 2 or 4
// side by side, and software prefetch did not help). M > 1: kGemmR weight rows are unpacked once
// into a small buffer and applied to all M activation rows, kGemmC at a time (a kGemmR x kGemmC
// register tile of accumulators).
// float32 path: each weight row is dequantized to floats once and dotted with every row of x.
//
// Threads: output rows are cut in chunks claimed from an atomic counter by the calling thread and
// by tasks scheduled on XLA's intra-op pool (ffi::ThreadPool); the caller spins (then yields) until
// every chunk is done. The job lives in a std::shared_ptr, so a task that starts late finds no
// chunk left and touches nothing else. With num_threads = 0 the helpers back off while they keep
// arriving too late to help (other processes on the other cores); see HelperPolicy.
//
// The drivers at the end of this file are compiled once per SIMD ISA (#include __FILE__ with that
// ISA's Ops and target attribute): GCC inlines target intrinsics only into functions of the same
// target.

#ifndef JAXINFER_QM_BODY

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define JAXINFER_QM_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxinfer_qm {

constexpr int kBlock = 32;
enum QType : int32_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };
enum Isa : int32_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };
enum Activations : int32_t { kInt8 = 0, kFloat32 = 1 };

constexpr int BlockBytes(int32_t qtype) {
  return qtype == kQ4_0 ? 18 : qtype == kQ4_1 ? 20 : qtype == kQ8_0 ? 34 : 0;
}

// Threading: below kMinParallelBytes of work (weight bytes x M) one thread. M = 1 streams weights:
// a chunk is kGemvChunksPerThread-th of a thread's share, of kMinChunkBytes to kMaxChunkBytes
// (measured here with 2 threads: 24 KB chunks streamed at 15-25 GB/s, 180 KB+ at 40-50, one
// thread at 25-28). M > 1 is compute-bound: kGemmChunksPerThread chunks per thread.
constexpr int64_t kMinParallelBytes = 48 << 10;
constexpr int64_t kGemvChunksPerThread = 2, kGemmChunksPerThread = 4;
constexpr int64_t kMinChunkBytes = 128 << 10, kMaxChunkBytes = 1 << 20;

struct Problem {
  int32_t qtype;
  const float* x;  // [M, K]
  const uint8_t* w;  // [N, row_bytes]
  float* y;  // [M, N]
  int64_t M, K, N, nb, row_bytes;
  const uint8_t* act;  // quantized activations, act_stride bytes per row (layout: the ISA's)
  int64_t act_stride;
};

inline uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline int32_t LoadI32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline float F16ToF32(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float f = std::ldexp(float(mantissa), -24);  // zero or subnormal
    return sign ? -f : f;
  }
  const uint32_t bits = exponent == 31 ? sign | 0x7f800000u | (mantissa << 13)
                                       : sign | ((exponent + 112) << 23) | (mantissa << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

template <class T>
std::unique_ptr<T, FreeDeleter> AlignedBuffer(int64_t bytes) {
  return std::unique_ptr<T, FreeDeleter>(static_cast<T*>(std::aligned_alloc(64, RoundUp(std::max<int64_t>(bytes, 64), 64))));
}

// ---------------------------------------------------------------------------------------------
// Threads

inline void CpuRelax() {
#if defined(JAXINFER_QM_X86)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

template <class F>
struct Job {
  Job(int64_t n, F f) : num_chunks(n), fn(std::move(f)) {}
  void Work(bool helper) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < num_chunks;) {
      fn(i);
      if (helper) helper_chunks.fetch_add(1, std::memory_order_relaxed);
      done.fetch_add(1, std::memory_order_release);
    }
  }
  const int64_t num_chunks;
  F fn;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<int64_t> helper_chunks{0};
  std::atomic<bool> helper_started{false};
};

// Adaptive helpers (num_threads = 0). When other processes hold the other cores, a helper task
// starts only after the caller has done every chunk, or is preempted holding one while the caller
// waits: helpers then only cost time. After kMaxMisses such calls in a row the next kBackoffCalls
// calls run on the caller alone, then helpers are tried again. Results do not depend on it: each
// output is computed by one thread, the same way.
constexpr int kMaxMisses = 4, kBackoffCalls = 64;
constexpr int64_t kSpinsBeforeYield = 2000;  // about 50 us; a chunk takes a few

struct HelperPolicy {
  std::atomic<int> misses{0}, backoff{0};
};
inline HelperPolicy helper_policy;

// Counters read (and reset) by jaxinfer_qmatmul_thread_stats, for diagnosing threads on a host.
enum Stat {
  kParallelCalls,  // calls that scheduled helpers
  kChunks,         // their chunks
  kHelperChunks,   // of which helpers did
  kAloneCalls,     // calls run on the caller alone while backing off
  kWaitNs,         // caller's wait for helpers after its own last chunk
  kHelperDelayNs,  // from scheduling a helper to its start (late ones included)
  kCalls,          // handler calls
  kCallNs,         // time in the handler
  kNumStats
};
struct ThreadStats {
  std::atomic<int64_t> v[kNumStats] = {};
  void Add(Stat s, int64_t x) { v[s].fetch_add(x, std::memory_order_relaxed); }
};
inline ThreadStats thread_stats;

inline int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// fn(i) for i in [0, num_chunks) on the caller and up to num_helpers pool tasks.
template <class F>
void ParallelFor(ffi::ThreadPool& pool, int64_t num_chunks, int64_t num_helpers, bool adaptive, F fn) {
  num_helpers = std::min(num_helpers, num_chunks - 1);
  if (adaptive && num_helpers > 0 && helper_policy.backoff.load(std::memory_order_relaxed) > 0) {
    helper_policy.backoff.fetch_sub(1, std::memory_order_relaxed);
    thread_stats.Add(kAloneCalls, 1);
    num_helpers = 0;
  }
  if (num_helpers <= 0) {
    for (int64_t i = 0; i < num_chunks; ++i) fn(i);
    return;
  }
  auto job = std::make_shared<Job<F>>(num_chunks, std::move(fn));
  const int64_t start = NowNs();
  for (int64_t h = 0; h < num_helpers; ++h) {
    pool.Schedule([job, start] {
      job->helper_started.store(true, std::memory_order_relaxed);
      thread_stats.Add(kHelperDelayNs, NowNs() - start);
      job->Work(true);
    });
  }
  job->Work(false);
  // Spinning long means the helper holding the last chunk was preempted: yielding may give it
  // this core back.
  const int64_t wait_start = NowNs();
  int64_t spins = 0;
  for (; job->done.load(std::memory_order_acquire) < num_chunks; ++spins) {
    if (spins < kSpinsBeforeYield) {
      CpuRelax();
    } else {
      std::this_thread::yield();
    }
  }
  const int64_t helper_chunks = job->helper_chunks.load(std::memory_order_relaxed);
  thread_stats.Add(kParallelCalls, 1);
  thread_stats.Add(kChunks, num_chunks);
  thread_stats.Add(kHelperChunks, helper_chunks);
  thread_stats.Add(kWaitNs, NowNs() - wait_start);
  if (adaptive) {
    if (job->helper_started.load(std::memory_order_relaxed) && spins < kSpinsBeforeYield) {
      helper_policy.misses.store(0, std::memory_order_relaxed);
    } else if (helper_policy.misses.fetch_add(1, std::memory_order_relaxed) + 1 >= kMaxMisses) {
      helper_policy.misses.store(0, std::memory_order_relaxed);
      helper_policy.backoff.store(kBackoffCalls, std::memory_order_relaxed);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Scalar int8 path. Activation layout per row: int8 q[nb * 32], float d[nb], float s[nb]
// (s = d * sum of the block's quants).

inline int64_t ScalarStride(int64_t nb) { return RoundUp(nb * (kBlock + 8), 64); }

void QuantizeRowsScalar(const Problem& p, int64_t c0, int64_t c1, uint8_t* act) {
  for (int64_t c = c0; c < c1; ++c) {
    const float* x = p.x + c * p.K;
    int8_t* q = reinterpret_cast<int8_t*>(act + c * p.act_stride);
    float* d = reinterpret_cast<float*>(act + c * p.act_stride + p.nb * kBlock);
    float* s = d + p.nb;
    for (int64_t b = 0; b < p.nb; ++b, x += kBlock, q += kBlock) {
      float amax = 0.0f;
      for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(x[j]));
      const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
      int sum = 0;
      for (int j = 0; j < kBlock; ++j) {
        const int v = int(std::nearbyint(x[j] * id));  // round to nearest even, like cvtps2dq
        q[j] = int8_t(v);
        sum += v;
      }
      d[b] = db;
      s[b] = db * float(sum);
    }
  }
}

template <int32_t Q>
void RowsScalar(const Problem& p, int64_t r0, int64_t r1) {
  constexpr int kB = BlockBytes(Q);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.w + r * p.row_bytes;
    for (int64_t c = 0; c < p.M; ++c) {
      const int8_t* aq = reinterpret_cast<const int8_t*>(p.act + c * p.act_stride);
      const float* ad = reinterpret_cast<const float*>(p.act + c * p.act_stride + p.nb * kBlock);
      const float* as = ad + p.nb;
      float acc = 0.0f;
      for (int64_t b = 0; b < p.nb; ++b, aq += kBlock) {
        const uint8_t* blk = row + b * kB;
        const float dw = F16ToF32(LoadU16(blk));
        int32_t isum = 0;
        if (Q == kQ8_0) {
          const int8_t* qs = reinterpret_cast<const int8_t*>(blk + 2);
          for (int j = 0; j < kBlock; ++j) isum += int32_t(qs[j]) * aq[j];
        } else {
          const uint8_t* qs = blk + (Q == kQ4_1 ? 4 : 2);
          const int off = Q == kQ4_0 ? 8 : 0;
          for (int j = 0; j < 16; ++j) {
            isum += (int32_t(qs[j] & 15) - off) * aq[j] + (int32_t(qs[j] >> 4) - off) * aq[j + 16];
          }
        }
        acc += float(isum) * (dw * ad[b]);
        if (Q == kQ4_1) acc += F16ToF32(LoadU16(blk + 2)) * as[b];
      }
      p.y[c * p.N + r] = acc;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// float32 activations: dequantize each weight row once, dot it with every row of x. Plain C++,
// inlined into one function per ISA so the compiler vectorizes it for that ISA; the sums run in 16
// lanes in a fixed order (and -ffp-contract=off), so every ISA gives the same result.

template <int32_t Q>
__attribute__((always_inline)) inline void DequantizeRow(const uint8_t* row, int64_t nb, float* out) {
  constexpr int kB = BlockBytes(Q);
  for (int64_t b = 0; b < nb; ++b, row += kB, out += kBlock) {
    const float d = F16ToF32(LoadU16(row));
    if (Q == kQ8_0) {
      const int8_t* qs = reinterpret_cast<const int8_t*>(row + 2);
      for (int j = 0; j < kBlock; ++j) out[j] = float(qs[j]) * d;
    } else if (Q == kQ4_0) {
      const uint8_t* qs = row + 2;
      for (int j = 0; j < 16; ++j) {
        out[j] = float(int(qs[j] & 15) - 8) * d;
        out[j + 16] = float(int(qs[j] >> 4) - 8) * d;
      }
    } else {
      const float m = F16ToF32(LoadU16(row + 2));
      const uint8_t* qs = row + 4;
      for (int j = 0; j < 16; ++j) {
        out[j] = float(qs[j] & 15) * d + m;
        out[j + 16] = float(qs[j] >> 4) * d + m;
      }
    }
  }
}

template <int32_t Q>
__attribute__((always_inline)) inline void RowsFloatBody(const Problem& p, int64_t r0, int64_t r1) {
  std::vector<float> buffer(p.K);
  float* wf = buffer.data();
  for (int64_t r = r0; r < r1; ++r) {
    DequantizeRow<Q>(p.w + r * p.row_bytes, p.nb, wf);
    for (int64_t c = 0; c < p.M; ++c) {
      const float* x = p.x + c * p.K;
      float part[16] = {};
      for (int64_t k = 0; k < p.K; k += 16) {
        for (int j = 0; j < 16; ++j) part[j] += wf[k + j] * x[k + j];
      }
      for (int width = 8; width >= 1; width /= 2) {
        for (int j = 0; j < width; ++j) part[j] += part[j + width];
      }
      p.y[c * p.N + r] = part[0];
    }
  }
}

template <int32_t Q>
void RowsFloatScalar(const Problem& p, int64_t r0, int64_t r1) { RowsFloatBody<Q>(p, r0, r1); }

#if defined(JAXINFER_QM_X86)

// ---------------------------------------------------------------------------------------------
// SIMD Ops: the activation layout, the unpacking of a group of weight blocks into W, and the dot of
// one unpacked group with one activation group. W: a = quants of elements 0..15 of each block
// (Q4: the low nibbles), b = elements 16..31, d = scales, e = Q4_1 mins, spread over each block's
// lanes; avx2's Q8_0: a and b the quants of the group's two blocks, d and e their scales.

#define JAXINFER_QM_AVX2_TARGET "avx2,fma,f16c"
#define JAXINFER_QM_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c"
#define JAXINFER_QM_INLINE(isa) __attribute__((target(isa), always_inline)) inline

// AVX2, groups of 2 blocks, 128 bytes per activation group:
//   Q4: int8 lo[32] (elements 0..15 of block j at 16j), int8 hi[32] (elements 16..31), float
//       d[8] (block j's scale in lanes 4j..4j+3), extra[8] (lane 4j: Q4_0 int32 -8 sum(q_a),
//       Q4_1 float d sum(q_a); other lanes zero);
//   Q8_0: int8 q[64] (natural order), float d[16] (block j in lanes 8j..8j+7).
struct Avx2Ops {
  using F = __m256;
  using I = __m256i;
  struct W {
    I a, b;
    F d, e;
  };
  static constexpr int kGroup = 2, kGemvR = 1, kGemmR = 2, kGemmC = 4;
  static constexpr int64_t kWBytes = 4 * sizeof(I);
  static constexpr int64_t ActGroupBytes(int32_t) { return 128; }

  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX2_TARGET) F Zero() { return _mm256_setzero_ps(); }
  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX2_TARGET) float Reduce(F a) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  // out[i] = sum of v[i]'s lanes, i < kGemmR * kGemmC = 8 (a transposing tree: 21 ops, not 8 x 8).
  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX2_TARGET) void ReduceAll(const F* v, float* out) {
    F u[4];
    for (int i = 0; i < 4; ++i) {  // halves: v[i] low, v[i + 4] high
      u[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[i], v[i + 4], 0x20), _mm256_permute2f128_ps(v[i], v[i + 4], 0x31));
    }
    const F x0 = _mm256_add_ps(_mm256_unpacklo_ps(u[0], u[1]), _mm256_unpackhi_ps(u[0], u[1]));
    const F x1 = _mm256_add_ps(_mm256_unpacklo_ps(u[2], u[3]), _mm256_unpackhi_ps(u[2], u[3]));
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_shuffle_ps(x0, x1, 0x44), _mm256_shuffle_ps(x0, x1, 0xee)));
  }
  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX2_TARGET) I LoadI(const uint8_t* p) {
    return _mm256_load_si256(reinterpret_cast<const I*>(p));
  }
  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX2_TARGET) F LoadF(const uint8_t* p) {
    return _mm256_load_ps(reinterpret_cast<const float*>(p));
  }
  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX2_TARGET) void Store(uint8_t* p, const W& w) {
    _mm256_store_si256(reinterpret_cast<I*>(p), w.a);
    _mm256_store_si256(reinterpret_cast<I*>(p + 32), w.b);
    _mm256_store_ps(reinterpret_cast<float*>(p + 64), w.d);
    _mm256_store_ps(reinterpret_cast<float*>(p + 96), w.e);
  }

  // blocks = 2, or 1 for a row's last, partial group.
  template <int32_t Q, bool kPartial>
  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX2_TARGET) W Unpack(const uint8_t* p, int64_t /*blocks*/) {
    constexpr int kB = BlockBytes(Q);
    W w;
    // scales: word 0 of each block's first dword, f16 -> lanes 0 and 2
    __m128i s = _mm_cvtsi32_si128(LoadI32(p));
    if (!kPartial) s = _mm_insert_epi32(s, LoadI32(p + kB), 1);
    const F f = _mm256_castps128_ps256(_mm_cvtph_ps(s));  // [d0, m0, d1, m1]
    if (Q == kQ8_0) {
      w.a = _mm256_loadu_si256(reinterpret_cast<const I*>(p + 2));
      w.b = kPartial ? _mm256_setzero_si256() : _mm256_loadu_si256(reinterpret_cast<const I*>(p + kB + 2));
      w.d = _mm256_permutevar8x32_ps(f, _mm256_set1_epi32(0));
      w.e = kPartial ? _mm256_setzero_ps() : _mm256_permutevar8x32_ps(f, _mm256_set1_epi32(2));
      return w;
    }
    constexpr int kOff = Q == kQ4_1 ? 4 : 2;
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kOff));
    const I q = kPartial ? _mm256_zextsi128_si256(lo)
                         : _mm256_inserti128_si256(_mm256_castsi128_si256(lo),
                                                   _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kB + kOff)), 1);
    const I low4 = _mm256_set1_epi8(0x0f);
    w.a = _mm256_and_si256(q, low4);
    w.b = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
    w.d = _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));  // partial: d1 = m1 = 0
    w.e = Q == kQ4_1 ? _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3)) : _mm256_setzero_ps();
    return w;
  }

  template <int32_t Q>
  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX2_TARGET) F Dot(I a, I b, F d, F e, const uint8_t* g, F acc) {
    const I ones = _mm256_set1_epi16(1);
    if (Q == kQ8_0) {
      const I q0 = LoadI(g), q1 = LoadI(g + 32);
      const I t0 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(q0, a)), ones);
      const I t1 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(b, b), _mm256_sign_epi8(q1, b)), ones);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t0), _mm256_mul_ps(d, LoadF(g + 64)), acc);
      return _mm256_fmadd_ps(_mm256_cvtepi32_ps(t1), _mm256_mul_ps(e, LoadF(g + 96)), acc);
    }
    const I sum16 = _mm256_add_epi16(_mm256_maddubs_epi16(a, LoadI(g)), _mm256_maddubs_epi16(b, LoadI(g + 32)));
    I t = _mm256_madd_epi16(sum16, ones);  // |sum16| <= 2 * 2 * 15 * 127: no saturation
    const I extra = LoadI(g + 96);
    if (Q == kQ4_0) t = _mm256_add_epi32(t, extra);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(d, LoadF(g + 64)), acc);
    if (Q == kQ4_1) acc = _mm256_fmadd_ps(e, _mm256_castsi256_ps(extra), acc);
    return acc;
  }

  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX2_TARGET) float Hmax(F a) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }

  static __attribute__((target(JAXINFER_QM_AVX2_TARGET))) void QuantizeRows(const Problem& p, int64_t c0, int64_t c1,
                                                                           uint8_t* act) {
    const int64_t groups = RoundUp(p.nb, kGroup) / kGroup;
    const F sign = _mm256_set1_ps(-0.0f);
    for (int64_t c = c0; c < c1; ++c) {
      const float* x = p.x + c * p.K;
      uint8_t* row = act + c * p.act_stride;
      std::memset(row + (groups - 1) * 128, 0, 128);  // the padding of a partial last group
      for (int64_t b = 0; b < p.nb; ++b, x += kBlock) {
        F v[4];
        for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + 8 * i);
        const F m01 = _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1]));
        const F m23 = _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]));
        const float amax = Hmax(_mm256_max_ps(m01, m23));
        const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        I i[4];
        for (int k = 0; k < 4; ++k) i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], _mm256_set1_ps(id)));
        const I s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        const int sum = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1)));
        // packs interleave 128-bit lanes; the permute restores elements 0..31 in order
        const I q = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3])),
            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        uint8_t* g = row + b / kGroup * 128;
        const int64_t j = b % kGroup;
        if (p.qtype == kQ8_0) {
          _mm256_storeu_si256(reinterpret_cast<I*>(g + 32 * j), q);
          _mm256_storeu_ps(reinterpret_cast<float*>(g + 64) + 8 * j, _mm256_set1_ps(db));
        } else {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(g + 16 * j), _mm256_castsi256_si128(q));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(g + 32 + 16 * j), _mm256_extracti128_si256(q, 1));
          _mm_storeu_ps(reinterpret_cast<float*>(g + 64) + 4 * j, _mm_set1_ps(db));
          int32_t extra[4] = {0, 0, 0, 0};
          if (p.qtype == kQ4_0) {
            extra[0] = -8 * sum;
          } else {
            const float s1 = db * float(sum);
            std::memcpy(extra, &s1, 4);
          }
          std::memcpy(g + 96 + 16 * j, extra, 16);
        }
      }
    }
  }
};

// AVX-512, groups of 4 blocks, 256 bytes per activation group: int8 lo[64] (elements 0..15 of
// block j at 16j), int8 hi[64] (elements 16..31), float d[16] (block j in lanes 4j..4j+3), extra[16]
// (lane 4j: Q4_0 int32 -8 sum(q_a) and Q8_0 int32 -128 sum(q_a), vpdpbusd's starting values; Q4_1
// float d sum(q_a); other lanes zero). Q8_0 weights are split the same way (a = elements 0..15 of
// the 4 blocks, b = 16..31), so every format needs one convert and one FMA per 4 blocks.
struct Avx512Ops {
  using F = __m512;
  using I = __m512i;
  struct W {
    I a, b;
    F d, e;
  };
  static constexpr int kGroup = 4, kGemvR = 1, kGemmR = 4, kGemmC = 4;
  static constexpr int64_t kWBytes = 4 * sizeof(I);
  static constexpr int64_t ActGroupBytes(int32_t) { return 256; }

  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX512_TARGET) F Zero() { return _mm512_setzero_ps(); }
  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX512_TARGET) float Reduce(F a) { return _mm512_reduce_add_ps(a); }
  // out[i] = sum of v[i]'s lanes, i < kGemmR * kGemmC = 16 (a transposing tree: 46 ops, not 16 x 10).
  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX512_TARGET) void ReduceAll(const F* v, float* out) {
    F u[8], w[4];
    for (int i = 0; i < 8; ++i) {  // quarters 0-1: v[i], 2-3: v[i + 8]
      u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xee));
    }
    for (int i = 0; i < 4; ++i) {  // quarters: v[i], v[i + 8], v[i + 4], v[i + 12]
      w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[i], u[i + 4], 0x88), _mm512_shuffle_f32x4(u[i], u[i + 4], 0xdd));
    }
    const F x0 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
    const F x1 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
    const F y = _mm512_add_ps(_mm512_shuffle_ps(x0, x1, 0x44), _mm512_shuffle_ps(x0, x1, 0xee));
    // lane 4k + j holds v[j + {0, 8, 4, 12}[k]]
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(_mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15), y));
  }
  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX512_TARGET) I LoadI(const uint8_t* p) { return _mm512_load_si512(p); }
  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX512_TARGET) F LoadF(const uint8_t* p) { return _mm512_load_ps(p); }
  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX512_TARGET) void Store(uint8_t* p, const W& w) {
    _mm512_store_si512(p, w.a);
    _mm512_store_si512(p + 64, w.b);
    _mm512_store_ps(p + 128, w.d);
    _mm512_store_ps(p + 192, w.e);
  }

  // blocks = 4, or 1..3 for a row's last, partial group (read with masked loads: zeros beyond).
  template <int32_t Q, bool kPartial>
  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX512_TARGET) W Unpack(const uint8_t* p, int64_t blocks) {
    W w;
    if (Q == kQ8_0) {
      I a, b, c;
      if (kPartial) {  // at most 102 bytes
        const int64_t n = 34 * blocks;
        a = _mm512_maskz_loadu_epi8(n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1, p);
        b = n > 64 ? _mm512_maskz_loadu_epi8((__mmask64{1} << (n - 64)) - 1, p + 64) : _mm512_setzero_si512();
        c = _mm512_setzero_si512();
      } else {
        a = _mm512_loadu_si512(p);
        b = _mm512_loadu_si512(p + 64);
        c = _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 128)));
      }
      // words: block j's d is word 17j, its quants words 17j+1 .. 17j+16 (17j+1..8: elements
      // 0..15, 17j+9..16: elements 16..31); words 64..67 (block 3's last 8 quants) lie in c.
      const I ilo = _mm512_set_epi16(59, 58, 57, 56, 55, 54, 53, 52, 42, 41, 40, 39, 38, 37, 36, 35,
                                     25, 24, 23, 22, 21, 20, 19, 18, 8, 7, 6, 5, 4, 3, 2, 1);
      const I ihi = _mm512_set_epi16(0, 0, 0, 0, 63, 62, 61, 60, 50, 49, 48, 47, 46, 45, 44, 43,
                                     33, 32, 31, 30, 29, 28, 27, 26, 16, 15, 14, 13, 12, 11, 10, 9);
      const I ic = _mm512_set_epi16(3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
      const I id = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                    51, 51, 51, 51, 34, 34, 34, 34, 17, 17, 17, 17, 0, 0, 0, 0);
      const I flip = _mm512_set1_epi8(char(0x80));
      const I hi = _mm512_mask_permutexvar_epi16(_mm512_permutex2var_epi16(a, ihi, b), 0xf0000000u, ic, c);
      w.a = _mm512_xor_si512(_mm512_permutex2var_epi16(a, ilo, b), flip);
      w.b = _mm512_xor_si512(hi, flip);
      w.d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(a, id, b)));
      w.e = _mm512_setzero_ps();
      return w;
    }
    constexpr int kB = BlockBytes(Q);
    I a, b;
    if (kPartial) {  // at most 60 bytes
      a = _mm512_maskz_loadu_epi8((__mmask64{1} << (kB * blocks)) - 1, p);
      b = _mm512_setzero_si512();
    } else {
      a = _mm512_loadu_si512(p);
      b = Q == kQ4_1 ? _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 64)))
                     : _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 64)));
    }
    I q, sd;
    if (Q == kQ4_1) {  // dwords 5j+1 .. 5j+4 hold block j's quants; words 10j d, 10j+1 m
      q = _mm512_permutex2var_epi32(a, _mm512_setr_epi32(1, 2, 3, 4, 6, 7, 8, 9, 11, 12, 13, 14, 16, 17, 18, 19), b);
      sd = _mm512_permutexvar_epi16(_mm512_set_epi16(31, 31, 31, 31, 21, 21, 21, 21, 11, 11, 11, 11, 1, 1, 1, 1,
                                                     30, 30, 30, 30, 20, 20, 20, 20, 10, 10, 10, 10, 0, 0, 0, 0), a);
      w.e = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(sd, 1));
    } else {  // words 9j+1 .. 9j+8 hold block j's quants; word 9j d
      q = _mm512_permutex2var_epi16(a, _mm512_set_epi16(35, 34, 33, 32, 31, 30, 29, 28, 26, 25, 24, 23, 22, 21, 20, 19,
                                                        17, 16, 15, 14, 13, 12, 11, 10, 8, 7, 6, 5, 4, 3, 2, 1), b);
      sd = _mm512_permutexvar_epi16(_mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                     27, 27, 27, 27, 18, 18, 18, 18, 9, 9, 9, 9, 0, 0, 0, 0), a);
      w.e = _mm512_setzero_ps();
    }
    const I low4 = _mm512_set1_epi8(0x0f);
    w.a = _mm512_and_si512(q, low4);
    w.b = _mm512_and_si512(_mm512_srli_epi16(q, 4), low4);
    w.d = _mm512_cvtph_ps(_mm512_castsi512_si256(sd));
    return w;
  }

  template <int32_t Q>
  static JAXINFER_QM_INLINE(JAXINFER_QM_AVX512_TARGET) F Dot(I a, I b, F d, F e, const uint8_t* g, F acc) {
    const I extra = LoadI(g + 192);
    I t = _mm512_dpbusd_epi32(Q == kQ4_1 ? _mm512_setzero_si512() : extra, a, LoadI(g));
    t = _mm512_dpbusd_epi32(t, b, LoadI(g + 64));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(d, LoadF(g + 128)), acc);
    if (Q == kQ4_1) acc = _mm512_fmadd_ps(e, _mm512_castsi512_ps(extra), acc);
    return acc;
  }

  static __attribute__((target(JAXINFER_QM_AVX512_TARGET))) void QuantizeRows(const Problem& p, int64_t c0, int64_t c1,
                                                                             uint8_t* act) {
    const int64_t groups = RoundUp(p.nb, kGroup) / kGroup, group_bytes = ActGroupBytes(p.qtype);
    for (int64_t c = c0; c < c1; ++c) {
      const float* x = p.x + c * p.K;
      uint8_t* row = act + c * p.act_stride;
      std::memset(row + (groups - 1) * group_bytes, 0, group_bytes);  // the padding of a partial last group
      for (int64_t b = 0; b < p.nb; ++b, x += kBlock) {
        const F v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
        const I i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));  // nearest even
        const I i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
        const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
        uint8_t* g = row + b / kGroup * group_bytes;
        const int64_t j = b % kGroup;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(g + 16 * j), _mm512_cvtepi32_epi8(i0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(g + 64 + 16 * j), _mm512_cvtepi32_epi8(i1));
        _mm_storeu_ps(reinterpret_cast<float*>(g + 128) + 4 * j, _mm_set1_ps(db));
        int32_t extra[4] = {0, 0, 0, 0};
        if (p.qtype == kQ4_1) {
          const float s1 = db * float(sum);
          std::memcpy(extra, &s1, 4);
        } else {
          extra[0] = (p.qtype == kQ4_0 ? -8 : -128) * sum;
        }
        std::memcpy(g + 192 + 16 * j, extra, 16);
      }
    }
  }
};

#endif  // JAXINFER_QM_X86

}  // namespace jaxinfer_qm

#if defined(JAXINFER_QM_X86)
#define JAXINFER_QM_BODY
#define JAXINFER_QM_NS avx2
#define JAXINFER_QM_OPS Avx2Ops
#define JAXINFER_QM_TARGET __attribute__((target(JAXINFER_QM_AVX2_TARGET)))
#include __FILE__
#undef JAXINFER_QM_NS
#undef JAXINFER_QM_OPS
#undef JAXINFER_QM_TARGET
#define JAXINFER_QM_NS avx512
#define JAXINFER_QM_OPS Avx512Ops
#define JAXINFER_QM_TARGET __attribute__((target(JAXINFER_QM_AVX512_TARGET)))
#include __FILE__
#undef JAXINFER_QM_NS
#undef JAXINFER_QM_OPS
#undef JAXINFER_QM_TARGET
#undef JAXINFER_QM_BODY
#endif

namespace jaxinfer_qm {

// ---------------------------------------------------------------------------------------------
// Dispatch

bool HostSupports(int32_t isa) {
  switch (isa) {
    case kScalar:
      return true;
#if defined(JAXINFER_QM_X86)
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni") && HostSupports(kAvx2);
#endif
    default:
      return false;
  }
}

int32_t BestIsa() {
  static const int32_t best = HostSupports(kAvx512) ? kAvx512 : HostSupports(kAvx2) ? kAvx2 : kScalar;
  return best;
}

using RowsFn = void (*)(const Problem&, int64_t, int64_t);
using QuantizeFn = void (*)(const Problem&, int64_t, int64_t, uint8_t*);

struct Kernels {
  RowsFn rows = nullptr;
  QuantizeFn quantize = nullptr;  // int8 activations only
  int64_t act_stride = 0;
  int64_t tile_rows = 1;  // chunk boundaries are multiples of this
};

#if defined(JAXINFER_QM_X86)
template <class Ops, int32_t Q>
void SimdKernels(Kernels& k, int64_t nb, int64_t M, RowsFn rows, QuantizeFn quantize) {
  k.rows = rows;
  k.quantize = quantize;
  k.act_stride = RoundUp(nb, Ops::kGroup) / Ops::kGroup * Ops::ActGroupBytes(Q);
  k.tile_rows = M == 1 ? Ops::kGemvR : Ops::kGemmR;
}
#endif

template <int32_t Q>
Kernels PickFor(int32_t isa, int32_t activations, int64_t nb, int64_t M) {
  Kernels k;
  const bool f32 = activations == kFloat32;
  switch (isa) {
#if defined(JAXINFER_QM_X86)
    case kAvx512:
      SimdKernels<Avx512Ops, Q>(k, nb, M, f32 ? avx512::RowsFloat<Q> : avx512::Rows<Q>, avx512::QuantizeRows);
      break;
    case kAvx2:
      SimdKernels<Avx2Ops, Q>(k, nb, M, f32 ? avx2::RowsFloat<Q> : avx2::Rows<Q>, avx2::QuantizeRows);
      break;
#endif
    default:
      k.rows = f32 ? RowsFloatScalar<Q> : RowsScalar<Q>;
      k.quantize = QuantizeRowsScalar;
      k.act_stride = ScalarStride(nb);
      break;
  }
  if (f32) {
    k.quantize = nullptr;
    k.act_stride = 0;
  }
  return k;
}

Kernels Pick(int32_t qtype, int32_t isa, int32_t activations, int64_t nb, int64_t M) {
  switch (qtype) {
    case kQ4_0: return PickFor<kQ4_0>(isa, activations, nb, M);
    case kQ4_1: return PickFor<kQ4_1>(isa, activations, nb, M);
    default: return PickFor<kQ8_0>(isa, activations, nb, M);
  }
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                ffi::ResultBuffer<ffi::F32> y, int32_t qtype, int32_t activations, int32_t isa,
                int32_t num_threads) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("jaxinfer_qmatmul: expected x [M, K], w [N, row_bytes], y [M, N]");
  }
  const int64_t M = xd[0], K = xd[1], N = wd[0], row_bytes = wd[1];
  const int bb = BlockBytes(qtype);
  if (bb == 0) {
    return ffi::Error::InvalidArgument("jaxinfer_qmatmul: qtype must be 2 (Q4_0), 3 (Q4_1) or 8 (Q8_0), got " +
                                       std::to_string(qtype));
  }
  if (K % kBlock || row_bytes != K / kBlock * bb || yd[0] != M || yd[1] != N) {
    return ffi::Error::InvalidArgument("jaxinfer_qmatmul: shapes do not match: x [" + std::to_string(M) + ", " +
                                       std::to_string(K) + "], w [" + std::to_string(N) + ", " +
                                       std::to_string(row_bytes) + "], qtype " + std::to_string(qtype));
  }
  if (activations != kInt8 && activations != kFloat32) {
    return ffi::Error::InvalidArgument("jaxinfer_qmatmul: activations must be 0 (int8) or 1 (float32)");
  }
  if (isa == kAuto) isa = BestIsa();
  if (isa < kScalar || isa > kAvx512 || !HostSupports(isa)) {
    return ffi::Error::InvalidArgument("jaxinfer_qmatmul: isa " + std::to_string(isa) + " is not supported by this CPU");
  }
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(y->typed_data(), 0, sizeof(float) * M * N);
    return ffi::Error::Success();
  }

  const int64_t call_start = NowNs();
  const int64_t nb = K / kBlock;
  const Kernels k = Pick(qtype, isa, activations, nb, M);
  Problem p{qtype, x.typed_data(), w.typed_data(), y->typed_data(), M, K, N, nb, row_bytes, nullptr, k.act_stride};
  const int64_t pool_threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t threads = num_threads > 0 ? std::min<int64_t>(num_threads, pool_threads) : pool_threads;
  const int64_t work_bytes = N * row_bytes * (activations == kFloat32 ? 8 * M : M);
  const int64_t helpers = work_bytes < kMinParallelBytes ? 0 : threads - 1;
  const bool adaptive = num_threads <= 0;

  std::unique_ptr<uint8_t, FreeDeleter> act;
  if (k.quantize != nullptr) {
    act = AlignedBuffer<uint8_t>(M * k.act_stride);
    if (!act) return ffi::Error::Internal("jaxinfer_qmatmul: out of memory for the activation buffer");
    p.act = act.get();
    const int64_t rows_per_chunk = std::max<int64_t>(1, (16 << 10) / K);
    const int64_t chunks = (M + rows_per_chunk - 1) / rows_per_chunk;
    ParallelFor(pool, chunks, helpers, adaptive, [&p, k, rows_per_chunk](int64_t i) {
      k.quantize(p, i * rows_per_chunk, std::min(p.M, (i + 1) * rows_per_chunk), const_cast<uint8_t*>(p.act));
    });
  }

  // Chunks of whole tiles (see kMinChunkBytes).
  int64_t rows = N;
  if (helpers > 0 && M == 1) {
    rows = std::clamp(N * row_bytes / (threads * kGemvChunksPerThread), kMinChunkBytes, kMaxChunkBytes) / row_bytes;
  } else if (helpers > 0) {
    rows = (N + threads * kGemmChunksPerThread - 1) / (threads * kGemmChunksPerThread);
  }
  rows = RoundUp(std::max<int64_t>(rows, 1), k.tile_rows);
  const int64_t chunks = (N + rows - 1) / rows;
  ParallelFor(pool, chunks, helpers, adaptive, [&p, k, rows](int64_t i) {
    k.rows(p, i * rows, std::min(p.N, (i + 1) * rows));
  });
  thread_stats.Add(kCalls, 1);
  thread_stats.Add(kCallNs, NowNs() - call_start);
  return ffi::Error::Success();
}

}  // namespace jaxinfer_qm

extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* jaxinfer_qmatmul(XLA_FFI_CallFrame*);

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_qmatmul, jaxinfer_qm::Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::Buffer<ffi::U8>>()   // w [N, K / 32 * block bytes]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [M, N]
                                  .Attr<int32_t>("qtype")
                                  .Attr<int32_t>("activations")
                                  .Attr<int32_t>("isa")
                                  .Attr<int32_t>("num_threads"));

// Diagnostics: copies the counters of jaxinfer_qm::Stat (in its order) into out[8] and resets them.
extern "C" __attribute__((visibility("default"))) void jaxinfer_qmatmul_thread_stats(int64_t* out) {
  for (int i = 0; i < jaxinfer_qm::kNumStats; ++i) out[i] = jaxinfer_qm::thread_stats.v[i].exchange(0, std::memory_order_relaxed);
}

// Which isa codes (bit 1 << isa) this host runs: for the Python wrapper and the tests.
extern "C" __attribute__((visibility("default"))) int jaxinfer_qmatmul_isas() {
  int mask = 0;
  for (int32_t isa : {jaxinfer_qm::kScalar, jaxinfer_qm::kAvx2, jaxinfer_qm::kAvx512}) {
    if (jaxinfer_qm::HostSupports(isa)) mask |= 1 << isa;
  }
  return mask;
}

#else  // JAXINFER_QM_BODY: the drivers, compiled once per SIMD ISA (JAXINFER_QM_OPS, JAXINFER_QM_TARGET)

namespace jaxinfer_qm {
namespace JAXINFER_QM_NS {

using V = JAXINFER_QM_OPS;
using F = V::F;
using I = V::I;

// M = 1: rows r0 .. r0+R-1 against the one activation row.
template <int32_t Q, int R>
JAXINFER_QM_TARGET void GemvTile(const Problem& p, int64_t r0) {
  constexpr int64_t kWG = V::kGroup * BlockBytes(Q), kAG = V::ActGroupBytes(Q);
  const uint8_t* w[R];
  for (int r = 0; r < R; ++r) w[r] = p.w + (r0 + r) * p.row_bytes;
  const uint8_t* a = p.act;
  F acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V::Zero();
  const int64_t full = p.nb / V::kGroup, rest = p.nb % V::kGroup;
  for (int64_t g = 0; g < full; ++g, a += kAG) {
    for (int r = 0; r < R; ++r) {
      const V::W u = V::template Unpack<Q, false>(w[r] + g * kWG, V::kGroup);
      acc[r] = V::template Dot<Q>(u.a, u.b, u.d, u.e, a, acc[r]);
    }
  }
  if (rest) {
    for (int r = 0; r < R; ++r) {
      const V::W u = V::template Unpack<Q, true>(w[r] + full * kWG, rest);
      acc[r] = V::template Dot<Q>(u.a, u.b, u.d, u.e, a, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) p.y[r0 + r] = V::Reduce(acc[r]);
}

// M > 1: kGemmR unpacked weight rows (wbuf: [group][row] of kWBytes) x activation rows c0 .. c0+C-1.
template <int32_t Q, int C>
JAXINFER_QM_TARGET void GemmTile(const Problem& p, const uint8_t* wbuf, int64_t groups, int64_t r0, int64_t rows,
                                 int64_t c0) {
  constexpr int R = V::kGemmR;
  constexpr int64_t kAG = V::ActGroupBytes(Q), kV = sizeof(I);
  const uint8_t* a[C];
  for (int c = 0; c < C; ++c) a[c] = p.act + (c0 + c) * p.act_stride;
  F acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) acc[r][c] = V::Zero();
  }
  for (int64_t g = 0; g < groups; ++g, wbuf += R * V::kWBytes) {
    I wa[R], wb[R];
    for (int r = 0; r < R; ++r) {
      wa[r] = V::LoadI(wbuf + r * V::kWBytes);
      wb[r] = V::LoadI(wbuf + r * V::kWBytes + kV);
    }
    for (int c = 0; c < C; ++c) {
      for (int r = 0; r < R; ++r) {
        const uint8_t* u = wbuf + r * V::kWBytes;
        acc[r][c] = V::template Dot<Q>(wa[r], wb[r], V::LoadF(u + 2 * kV), V::LoadF(u + 3 * kV), a[c] + g * kAG,
                                       acc[r][c]);
      }
    }
  }
  float out[R][C];
  if (C == V::kGemmC) {
    V::ReduceAll(&acc[0][0], &out[0][0]);
  } else {
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) out[r][c] = V::Reduce(acc[r][c]);
    }
  }
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < C; ++c) p.y[(c0 + c) * p.N + r0 + r] = out[r][c];
  }
}

template <int32_t Q>
JAXINFER_QM_TARGET void Gemm(const Problem& p, int64_t r0, int64_t r1) {
  constexpr int R = V::kGemmR, C = V::kGemmC;
  static_assert(C == 4, "the tail switch below covers 1..3 rows");
  constexpr int64_t kWG = V::kGroup * BlockBytes(Q);
  const int64_t groups = RoundUp(p.nb, V::kGroup) / V::kGroup, full = p.nb / V::kGroup, rest = p.nb % V::kGroup;
  const auto buffer = AlignedBuffer<uint8_t>(groups * R * V::kWBytes);
  uint8_t* wbuf = buffer.get();
  for (int64_t r = r0; r < r1; r += R) {
    const int64_t rows = std::min<int64_t>(R, r1 - r);
    for (int i = 0; i < R; ++i) {  // a partial tile repeats its last row (computed, not stored)
      const uint8_t* row = p.w + (r + std::min<int64_t>(i, rows - 1)) * p.row_bytes;
      for (int64_t g = 0; g < full; ++g) V::Store(wbuf + (g * R + i) * V::kWBytes, V::template Unpack<Q, false>(row + g * kWG, V::kGroup));
      if (rest) V::Store(wbuf + (full * R + i) * V::kWBytes, V::template Unpack<Q, true>(row + full * kWG, rest));
    }
    // The tiles below read no weights, so the hardware prefetcher idles: fetch the rows of the tile
    // after next now (streaming weights ran 2-3x slower than cached ones without this).
    for (int64_t ahead = r == r0 ? 1 : 2; ahead <= 2; ++ahead) {
      const char* next = reinterpret_cast<const char*>(p.w + (r + ahead * R) * p.row_bytes);
      const int64_t next_bytes = std::min<int64_t>(R, std::max<int64_t>(0, p.N - r - ahead * R)) * p.row_bytes;
      for (int64_t off = 0; off < next_bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
    }
    int64_t c0 = 0;
    for (; c0 + C <= p.M; c0 += C) GemmTile<Q, C>(p, wbuf, groups, r, rows, c0);
    switch (p.M - c0) {
      case 1: GemmTile<Q, 1>(p, wbuf, groups, r, rows, c0); break;
      case 2: GemmTile<Q, 2>(p, wbuf, groups, r, rows, c0); break;
      case 3: GemmTile<Q, 3>(p, wbuf, groups, r, rows, c0); break;
      default: break;
    }
  }
}

template <int32_t Q>
JAXINFER_QM_TARGET void Rows(const Problem& p, int64_t r0, int64_t r1) {
  if (p.M > 1) return Gemm<Q>(p, r0, r1);
  int64_t r = r0;
  for (; r + V::kGemvR <= r1; r += V::kGemvR) GemvTile<Q, V::kGemvR>(p, r);
  for (; r < r1; ++r) GemvTile<Q, 1>(p, r);
}

template <int32_t Q>
JAXINFER_QM_TARGET void RowsFloat(const Problem& p, int64_t r0, int64_t r1) { RowsFloatBody<Q>(p, r0, r1); }

void QuantizeRows(const Problem& p, int64_t c0, int64_t c1, uint8_t* act) { V::QuantizeRows(p, c0, c1, act); }

}  // namespace JAXINFER_QM_NS
}  // namespace jaxinfer_qm

#endif  // JAXINFER_QM_BODY
