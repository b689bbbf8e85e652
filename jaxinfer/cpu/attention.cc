// Paged attention read in place from the KV page pool: XLA FFI handlers for the CPU path.
//
// Axis letters as in pallas_kernels/ragged_paged_attention.py: B rows (sequences), T query tokens,
// H query heads, K KV heads, G = H / K, D head_dim, P pages in the pool, L page size.
//
// Targets (the contract is ragged_paged_attention_reference's; jaxinfer/cpu/paged_attention.py
// wraps them):
//   jaxinfer_paged_decode_attention(q [B, H, D] f32, k_pages, v_pages [K, P, L, D] f32|bf16|f16,
//       kv_lens [B] i32, page_indices [B, Pmax] i32, num_seqs [1] i32, page_offset [1] i32)
//       -> [B, H, D] f32; attributes sm_scale (f32), isa (i32: 0 auto, 1 scalar, 2 avx2, 3 avx512).
//       One query per row, which sees slots 0..kv_lens[b]-1. Rows b >= num_seqs or with
//       kv_lens[b] == 0 are zero.
//   jaxinfer_ragged_paged_attention(q [T, H, D] f32, k_pages, v_pages, kv_lens [B],
//       page_indices [B, Pmax], cu_q_lens [B+1], num_seqs [1], page_offset [1]) -> [T, H, D] f32;
//       same attributes. Query row i of sequence b sits at position kv_lens[b] - q_len_b + i and
//       sees the slots at or before it (prefill chunks). Rows at or after cu_q_lens[num_seqs] are zero.
//   jaxinfer_tree_attention(q [B * N, H, D] f32, k_pages, v_pages, kv_lens [B], page_indices [B, Pmax],
//       tree_mask [B, N, N] bool, page_offset [1]) -> [B * N, H, D] f32; same attributes. The contract
//       is tree_attention_reference's (pallas_kernels/tree_attention.py): node i of request b sees the
//       committed slots 0..kv_lens[b]-1 and the tree slots kv_lens[b] + j of its ancestors-or-self j
//       (tree_mask[b, i, j]); a node that sees nothing is zero. It runs exactly as a decode row would
//       once the node's path is committed: the path's tree slots are read as positions kv_lens[b],
//       kv_lens[b] + 1, ... (ancestor j at its depth), so a verified node's output is bit for bit the
//       decode step's that plain decoding runs for the same token (speculative decoding stays exact).
// Page-table entries get page_offset added (the layer's first page) and are then clamped into
// [0, P), kv_lens into [0, Pmax * L], like the reference's clipping gathers.
//
// Kernel: a "tile" is up to kMaxRows query vectors that read the same KV head of one sequence
// (decode: the G heads of one KV head; prefill: G heads x a few consecutive query tokens). The
// tile walks its slots in blocks of about kBlockSlots slots (whole pages, read where they lie in
// the pool): scores of every row against the block's keys (each key vector loaded once per group
// of 4 rows, from L1 for the later groups), an online-softmax update per row, then the
// probability-weighted values accumulated into [rows, D] with accumulators held in registers.
// The kernel body (end of this file) is compiled three times, for a portable scalar "vector" of
// width 1, AVX2+FMA+F16C and AVX-512F, each with its own __attribute__((target)); the handler picks
// one at run time (__builtin_cpu_supports). GCC will not inline target intrinsics into a template
// defined without the same target, so the body is included once per ISA (#include __FILE__).
//
// Threads: the work is a list of items (decode and tree nodes: a (row, KV head) pair, or a span of
// kSplitSlots of its slots when the row is longer, merged afterwards; prefill: a (sequence, KV head,
// query block)). A row's split depends on its length alone, never on the batch: a decode row's
// output is the same whatever else the step holds. Items are claimed from an atomic counter by the
// calling thread and by tasks scheduled on XLA's intra-op pool (ffi::ThreadPool). The caller then
// waits only until every claimed item is done (a short spin, then a condition variable, so that on a
// loaded machine it yields its core to a helper still holding an item); the job lives in a
// std::shared_ptr, so a task that starts late finds no item left and touches nothing else. Small
// calls (fewer than kMinParallelSlots slots to read) stay on the calling thread.

#ifndef JAXINFER_ATTENTION_BODY

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define JAXINFER_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jaxinfer_attention {

struct Bf16 { uint16_t bits; };
struct F16 { uint16_t bits; };

constexpr int kBlockSlots = 64;  // slots per softmax block (at least one page)
constexpr int kMaxRows = 16;     // query vectors per tile (a ragged tile holds at least one token's G)
constexpr int kSplitSlots = 512;  // decode rows longer than this are split into spans of this many slots
constexpr int64_t kMinParallelSlots = 1024;  // below this many (slot, KV head) pairs: one thread

enum Isa : int32_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float f16_to_float(uint16_t h) {
  uint32_t sign = uint32_t{h & 0x8000u} << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ffu, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exponent = 113;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Vector operations of one ISA. W lanes; RB vectors of D per accumulator block in the value pass.
struct ScalarOps {
  static constexpr int W = 1, RB = 4;
  using R = float;
  static inline R zero() { return 0.0f; }
  static inline R set1(float x) { return x; }
  static inline R load(const float* p) { return *p; }
  static inline void store(float* p, R x) { *p = x; }
  static inline R fma(R a, R b, R c) { return a * b + c; }
  static inline R mul(R a, R b) { return a * b; }
  static inline R max(R a, R b) { return std::max(a, b); }
  static inline R add(R a, R b) { return a + b; }
  static inline R sub(R a, R b) { return a - b; }
  static inline float hsum(R a) { return a; }
  static inline void hsum4(R a0, R a1, R a2, R a3, float* out) {
    out[0] = a0;
    out[1] = a1;
    out[2] = a2;
    out[3] = a3;
  }
  static inline float hmax(R a) { return a; }
  static inline R exp(R x) { return std::exp(x); }
  static inline R load_kv(const float* p) { return *p; }
  static inline R load_kv(const Bf16* p) { return bf16_to_float(p->bits); }
  static inline R load_kv(const F16* p) { return f16_to_float(p->bits); }
};

#ifdef JAXINFER_X86

// exp(x) for x <= 0 (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-5 polynomial; ~1 ulp). x is
// clamped at -87.3, where exp is ~1e-38: probabilities that small are zero for every purpose here.
constexpr float kExpLo = -87.3f, kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f,
                kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f, kExpP1 = 1.3981999507e-3f, kExpP2 = 8.3334519073e-3f,
                kExpP3 = 4.1665795894e-2f, kExpP4 = 1.6666665459e-1f, kExpP5 = 5.0000001201e-1f;

#define JAXINFER_AVX2 __attribute__((target("avx2,fma,f16c"), always_inline))

struct Avx2Ops {
  static constexpr int W = 8, RB = 2;
  using R = __m256;
  static JAXINFER_AVX2 inline R zero() { return _mm256_setzero_ps(); }
  static JAXINFER_AVX2 inline R set1(float x) { return _mm256_set1_ps(x); }
  static JAXINFER_AVX2 inline R load(const float* p) { return _mm256_loadu_ps(p); }
  static JAXINFER_AVX2 inline void store(float* p, R x) { _mm256_storeu_ps(p, x); }
  static JAXINFER_AVX2 inline R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static JAXINFER_AVX2 inline R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static JAXINFER_AVX2 inline R max(R a, R b) { return _mm256_max_ps(a, b); }
  static JAXINFER_AVX2 inline R add(R a, R b) { return _mm256_add_ps(a, b); }
  static JAXINFER_AVX2 inline R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static JAXINFER_AVX2 inline float hsum(R a) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  // out[i] = sum of a_i's lanes, for four vectors at once, each added in hsum's order
  // ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): a slot's score then has the same bits whether it
  // was scored alone or four at a time, which depends on how many query rows share its tile, and so
  // on where a prompt chunk starts (a prefix-cache hit must not change a token).
  static JAXINFER_AVX2 inline void hsum4(R a0, R a1, R a2, R a3, float* out) {
    const R a[4] = {a0, a1, a2, a3};
    __m128 u[4];
    for (int i = 0; i < 4; ++i) u[i] = _mm_add_ps(_mm256_castps256_ps128(a[i]), _mm256_extractf128_ps(a[i], 1));
    const __m128 s01 = _mm_add_ps(_mm_unpacklo_ps(u[0], u[1]), _mm_unpackhi_ps(u[0], u[1]));
    const __m128 s23 = _mm_add_ps(_mm_unpacklo_ps(u[2], u[3]), _mm_unpackhi_ps(u[2], u[3]));
    _mm_storeu_ps(out, _mm_add_ps(_mm_movelh_ps(s01, s23), _mm_movehl_ps(s23, s01)));
  }
  static JAXINFER_AVX2 inline float hmax(R a) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  static JAXINFER_AVX2 inline R exp(R x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(kExpLo));
    R n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    R y = _mm256_set1_ps(kExpP0);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP1));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP2));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP4));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(kExpP5));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
  }
  static JAXINFER_AVX2 inline R load_kv(const float* p) { return _mm256_loadu_ps(p); }
  static JAXINFER_AVX2 inline R load_kv(const Bf16* p) {
    __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  }
  static JAXINFER_AVX2 inline R load_kv(const F16* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

#define JAXINFER_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"), always_inline))

struct Avx512Ops {
  static constexpr int W = 16, RB = 4;
  using R = __m512;
  static JAXINFER_AVX512 inline R zero() { return _mm512_setzero_ps(); }
  static JAXINFER_AVX512 inline R set1(float x) { return _mm512_set1_ps(x); }
  static JAXINFER_AVX512 inline R load(const float* p) { return _mm512_loadu_ps(p); }
  static JAXINFER_AVX512 inline void store(float* p, R x) { _mm512_storeu_ps(p, x); }
  static JAXINFER_AVX512 inline R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static JAXINFER_AVX512 inline R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static JAXINFER_AVX512 inline R max(R a, R b) { return _mm512_max_ps(a, b); }
  static JAXINFER_AVX512 inline R add(R a, R b) { return _mm512_add_ps(a, b); }
  static JAXINFER_AVX512 inline R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static JAXINFER_AVX512 inline float hsum(R a) { return _mm512_reduce_add_ps(a); }
  static JAXINFER_AVX512 inline __m256 fold(R a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  }
  static JAXINFER_AVX512 inline void hsum4(R a0, R a1, R a2, R a3, float* out) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(fold(a0), fold(a1)), _mm256_hadd_ps(fold(a2), fold(a3)));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  }
  static JAXINFER_AVX512 inline float hmax(R a) { return _mm512_reduce_max_ps(a); }
  static JAXINFER_AVX512 inline R exp(R x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(kExpLo));
    R n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    R y = _mm512_set1_ps(kExpP0);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP1));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP2));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP4));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kExpP5));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
  }
  static JAXINFER_AVX512 inline R load_kv(const float* p) { return _mm512_loadu_ps(p); }
  static JAXINFER_AVX512 inline R load_kv(const Bf16* p) {
    __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  }
  static JAXINFER_AVX512 inline R load_kv(const F16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};

#endif  // JAXINFER_X86

// One tile's work: rows query vectors (pre-scaled by sm_scale, [rows, D] contiguous) against slots
// [0, end) of one sequence's pages in one KV head, row r seeing slots < limit[r], over the span
// [begin, end) (page-aligned begin). Out: unnormalized acc [rows, D], running max m and sum l.
// Positions at or after tail_begin are read from slot tail_slots[position - tail_begin] instead of
// slot = position (a tree node's path; decode: no tail).
struct Tile {
  const float* q;
  int rows;
  const int* limit;
  const void* k;  // this KV head's pages [P, L, D]
  const void* v;
  const int32_t* pages;  // the sequence's page-table row
  int32_t page_offset;
  int64_t num_pages;
  int page_size, head_dim;
  int begin, end;
  float* acc;
  float* m;
  float* l;
  int tail_begin = std::numeric_limits<int>::max();
  const int32_t* tail_slots = nullptr;
};

using TileFn = void (*)(const Tile&);

}  // namespace jaxinfer_attention

#define JAXINFER_ATTENTION_BODY
#define JAXINFER_NS scalar_kernels
#define JAXINFER_OPS ScalarOps
#define JAXINFER_TARGET
#include __FILE__
#undef JAXINFER_NS
#undef JAXINFER_OPS
#undef JAXINFER_TARGET
#ifdef JAXINFER_X86
#define JAXINFER_NS avx2_kernels
#define JAXINFER_OPS Avx2Ops
#define JAXINFER_TARGET __attribute__((target("avx2,fma,f16c")))
#include __FILE__
#undef JAXINFER_NS
#undef JAXINFER_OPS
#undef JAXINFER_TARGET
#define JAXINFER_NS avx512_kernels
#define JAXINFER_OPS Avx512Ops
#define JAXINFER_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#include __FILE__
#undef JAXINFER_NS
#undef JAXINFER_OPS
#undef JAXINFER_TARGET
#endif
#undef JAXINFER_ATTENTION_BODY

namespace jaxinfer_attention {

bool host_supports(int32_t isa) {
  switch (isa) {
    case kScalar:
      return true;
#ifdef JAXINFER_X86
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && host_supports(kAvx2);
#endif
    default:
      return false;
  }
}

int lanes(int32_t isa) { return isa == kAvx512 ? 16 : isa == kAvx2 ? 8 : 1; }

// The kernel for (isa, KV dtype, head_dim); auto picks the widest the host runs and D divides.
ffi::Error pick_kernel(int32_t isa, ffi::DataType dtype, int head_dim, TileFn* fn) {
  if (isa == kAuto) {
    isa = kScalar;
    for (int32_t candidate : {kAvx512, kAvx2}) {
      if (host_supports(candidate) && head_dim % lanes(candidate) == 0) {
        isa = candidate;
        break;
      }
    }
  }
  if (isa < kScalar || isa > kAvx512 || !host_supports(isa)) {
    return ffi::Error::InvalidArgument("paged attention: isa " + std::to_string(isa) + " is not supported by this host");
  }
  if (head_dim % lanes(isa)) {
    return ffi::Error::InvalidArgument("paged attention: head_dim " + std::to_string(head_dim) +
                                       " is not a multiple of the isa's " + std::to_string(lanes(isa)) + " lanes");
  }
  int t = dtype == ffi::DataType::F32 ? 0 : dtype == ffi::DataType::BF16 ? 1 : dtype == ffi::DataType::F16 ? 2 : -1;
  if (t < 0) return ffi::Error::InvalidArgument("paged attention: KV pages must be f32, bf16 or f16");
  static const TileFn table[4][3] = {
      {nullptr, nullptr, nullptr},
      {scalar_kernels::attend<float>, scalar_kernels::attend<Bf16>, scalar_kernels::attend<F16>},
#ifdef JAXINFER_X86
      {avx2_kernels::attend<float>, avx2_kernels::attend<Bf16>, avx2_kernels::attend<F16>},
      {avx512_kernels::attend<float>, avx512_kernels::attend<Bf16>, avx512_kernels::attend<F16>},
#else
      {nullptr, nullptr, nullptr},
      {nullptr, nullptr, nullptr},
#endif
  };
  *fn = table[isa][t];
  return ffi::Error::Success();
}

// Work shared by the calling thread and the pool's tasks; held by std::shared_ptr so that a task
// starting after the call returned finds next >= num_items and leaves at once.
struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t num_items = 0;
  std::mutex mutex;  // the last item's finisher wakes a caller blocked in wait()
  std::condition_variable finished;
  virtual ~Job() = default;
  virtual void run_item(int64_t i) = 0;

  void work() {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= num_items) return;
      run_item(i);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == num_items) {
        std::lock_guard<std::mutex> lock(mutex);
        finished.notify_all();
      }
    }
  }

  // Until every item is done: a short spin (items end within microseconds), then sleep, which
  // hands the core to a helper that the OS has not scheduled yet (a loaded machine).
  void wait() {
    for (int spins = 0; spins < 256; ++spins) {
      if (done.load(std::memory_order_acquire) == num_items) return;
#ifdef JAXINFER_X86
      _mm_pause();
#endif
    }
    std::unique_lock<std::mutex> lock(mutex);
    finished.wait(lock, [this] { return done.load(std::memory_order_acquire) == num_items; });
  }
};

void run_job(ffi::ThreadPool& pool, const std::shared_ptr<Job>& job, bool parallel) {
  if (parallel && job->num_items > 1) {
    const int64_t helpers = std::min<int64_t>(pool.num_threads(), job->num_items - 1);
    for (int64_t t = 0; t < helpers; ++t) {
      std::shared_ptr<Job> held = job;
      pool.Schedule([held] { held->work(); });
    }
  }
  job->work();
  job->wait();
}

// Per-thread scratch: the scaled query tile, its accumulators and limits.
struct Scratch {
  std::vector<float> q, acc, m, l;
  std::vector<int> limit;
  void reserve(int rows, int head_dim) {
    q.resize(size_t(rows) * head_dim);
    acc.resize(size_t(rows) * head_dim);
    m.resize(rows);
    l.resize(rows);
    limit.resize(rows);
  }
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

struct Pool {  // the pool arguments shared by both targets
  const void* k;
  const void* v;
  int64_t num_kv_heads, num_pages, page_size, head_dim, kv_head_stride;  // stride in elements
  size_t kv_width;  // bytes per KV element
  const int32_t* page_indices;
  int64_t pages_per_seq;
  int32_t page_offset;

  // The tile of ``rows`` query vectors in scratch against sequence ``seq``'s slots in one KV head.
  Tile tile(int64_t seq, int64_t kv_head, Scratch& s, int rows, int begin, int end,
            int tail_begin = std::numeric_limits<int>::max(), const int32_t* tail_slots = nullptr) const {
    const size_t offset = size_t(kv_head * kv_head_stride) * kv_width;
    return Tile{s.q.data(), rows, s.limit.data(), static_cast<const char*>(k) + offset,
                static_cast<const char*>(v) + offset, page_indices + seq * pages_per_seq, page_offset, num_pages,
                int(page_size), int(head_dim), begin, end, s.acc.data(), s.m.data(), s.l.data(), tail_begin,
                tail_slots};
  }
};

ffi::Error check_pool(ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> page_indices,
                      ffi::Buffer<ffi::S32> page_offset, int64_t num_heads, int64_t head_dim, Pool* pool) {
  auto kd = k.dimensions();
  if (kd.size() != 4 || v.dimensions().size() != 4 || k.element_type() != v.element_type()) {
    return ffi::Error::InvalidArgument("paged attention: k_pages and v_pages must be [K, P, L, D] of one dtype");
  }
  for (int i = 0; i < 4; ++i) {
    if (kd[i] != v.dimensions()[i]) return ffi::Error::InvalidArgument("paged attention: k/v pages differ in shape");
  }
  if (kd[3] != head_dim || kd[0] < 1 || num_heads % kd[0] || kd[1] < 1 || kd[2] < 1) {
    return ffi::Error::InvalidArgument("paged attention: head_dim or GQA grouping mismatch between q and pages");
  }
  if (page_indices.dimensions().size() != 2 || page_offset.element_count() != 1) {
    return ffi::Error::InvalidArgument("paged attention: page_indices must be [B, Pmax], page_offset [1]");
  }
  *pool = Pool{k.untyped_data(), v.untyped_data(), kd[0], kd[1], kd[2], kd[3], kd[1] * kd[2] * kd[3],
               ffi::ByteWidth(k.element_type()), page_indices.typed_data(), page_indices.dimensions()[1],
               page_offset.typed_data()[0]};
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Decode: one query per row. Tree nodes: one query per node, run as the decode row it becomes.

struct DecodeItem {
  int32_t row, kv_head, begin, end;
  int64_t partial;  // -1: the item covers the whole row, write the output; else its slot in partials
};

// A row of the job: its query and output row, its sequence's page-table row, its length, and (tree
// nodes) where its path starts and the path's tree slots.
struct DecodeRow {
  int64_t q_row, seq;
  int32_t len;
  int32_t tail_begin = std::numeric_limits<int32_t>::max();
  int64_t tail = -1;  // offset of its path's slots in DecodeJob::tails
};

struct DecodeJob : Job, std::enable_shared_from_this<DecodeJob> {
  TileFn fn;
  Pool pool;
  const float* q;
  float* out;
  int64_t group;
  float sm_scale;
  std::vector<DecodeRow> rows;
  std::vector<int32_t> tails;
  std::vector<DecodeItem> items;
  std::vector<float> partials;  // per split item: m, l, acc [G, D]

  void run_item(int64_t i) override {
    const DecodeItem& it = items[i];
    const DecodeRow& row = rows[it.row];
    const int32_t* tail = row.tail >= 0 ? tails.data() + row.tail : nullptr;
    const int64_t d = pool.head_dim, h0 = it.kv_head * group, num_heads = pool.num_kv_heads * group;
    Scratch& s = scratch();
    for (int64_t g0 = 0; g0 < group; g0 += kMaxRows) {
      const int rows_g = int(std::min<int64_t>(kMaxRows, group - g0));
      s.reserve(rows_g, int(d));
      const float* qrow = q + (row.q_row * num_heads + h0 + g0) * d;
      for (int64_t j = 0; j < rows_g * d; ++j) s.q[j] = qrow[j] * sm_scale;
      std::fill(s.limit.begin(), s.limit.begin() + rows_g, it.end);
      fn(pool.tile(row.seq, it.kv_head, s, rows_g, it.begin, it.end, row.tail_begin, tail));
      for (int r = 0; r < rows_g; ++r) {
        const float* a = s.acc.data() + r * d;
        if (it.partial < 0) {
          float* o = out + (row.q_row * num_heads + h0 + g0 + r) * d;
          const float inv = s.l[r] > 0.0f ? 1.0f / s.l[r] : 0.0f;
          for (int64_t j = 0; j < d; ++j) o[j] = a[j] * inv;
        } else {
          float* p = partials.data() + (it.partial * group + g0 + r) * (d + 2);
          p[0] = s.m[r];
          p[1] = s.l[r];
          std::memcpy(p + 2, a, sizeof(float) * d);
        }
      }
    }
  }

  // Items for every row (rows of length 0 are zeroed), run them, merge the split rows.
  void run(ffi::ThreadPool& thread_pool, int64_t num_heads) {
    const int64_t head_dim = pool.head_dim;
    int64_t total = 0;  // (slot, KV head) pairs read
    struct SplitUnit {
      int32_t row, kv_head;
      int64_t first, last;  // its spans' partials first..last-1
    };
    std::vector<SplitUnit> splits;
    int64_t num_partials = 0;
    for (int64_t b = 0; b < int64_t(rows.size()); ++b) {
      const int32_t len = rows[b].len;
      if (len == 0) {
        std::memset(out + rows[b].q_row * num_heads * head_dim, 0, sizeof(float) * num_heads * head_dim);
        continue;
      }
      total += int64_t(len) * pool.num_kv_heads;
      const bool split = len > kSplitSlots;
      for (int64_t h = 0; h < pool.num_kv_heads; ++h) {
        const int64_t first = num_partials;
        for (int64_t begin = 0; begin < len; begin += kSplitSlots) {
          const int32_t end = int32_t(std::min<int64_t>(len, begin + kSplitSlots));
          items.push_back(DecodeItem{int32_t(b), int32_t(h), int32_t(begin), end, split ? num_partials++ : -1});
        }
        if (split) splits.push_back(SplitUnit{int32_t(b), int32_t(h), first, num_partials});
      }
    }
    // Longest first, so that the last items claimed are short ones (ragged batches).
    std::stable_sort(items.begin(), items.end(),
                     [](const DecodeItem& a, const DecodeItem& b) { return a.end - a.begin > b.end - b.begin; });
    num_items = int64_t(items.size());
    partials.resize(size_t(num_partials * group * (head_dim + 2)));
    run_job(thread_pool, shared_from_this(), total >= kMinParallelSlots);

    // Merge the spans of split rows: out = sum_s e^(m_s - m) acc_s / sum_s e^(m_s - m) l_s.
    std::vector<float> merged(head_dim);
    for (const SplitUnit& unit : splits) {
      for (int64_t g = 0; g < group; ++g) {
        auto partial = [&](int64_t index) { return partials.data() + (index * group + g) * (head_dim + 2); };
        float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
        for (int64_t t = unit.first; t < unit.last; ++t) m = std::max(m, partial(t)[0]);
        std::fill(merged.begin(), merged.end(), 0.0f);
        for (int64_t t = unit.first; t < unit.last; ++t) {
          const float* p = partial(t);
          const float w = std::exp(p[0] - m);
          l += w * p[1];
          for (int64_t e = 0; e < head_dim; ++e) merged[e] += w * p[2 + e];
        }
        float* o = out + (rows[unit.row].q_row * num_heads + unit.kv_head * group + g) * head_dim;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int64_t e = 0; e < head_dim; ++e) o[e] = merged[e] * inv;
      }
    }
  }
};

// The job for q [rows, H, D] against the pool, or an error.
ffi::Error make_decode_job(ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages, ffi::AnyBuffer v_pages,
                           ffi::Buffer<ffi::S32> page_indices, ffi::Buffer<ffi::S32> page_offset,
                           ffi::ResultBuffer<ffi::F32>& out, float sm_scale, int32_t isa, const char* name,
                           std::shared_ptr<DecodeJob>* made) {
  auto qd = q.dimensions();
  if (qd.size() != 3) return ffi::Error::InvalidArgument(std::string(name) + ": q must be [rows, H, D]");
  auto job = std::make_shared<DecodeJob>();
  if (ffi::Error e = check_pool(k_pages, v_pages, page_indices, page_offset, qd[1], qd[2], &job->pool); e.failure()) {
    return e;
  }
  if (ffi::Error e = pick_kernel(isa, k_pages.element_type(), int(qd[2]), &job->fn); e.failure()) return e;
  job->q = q.typed_data();
  job->out = out->typed_data();
  job->group = qd[1] / job->pool.num_kv_heads;
  job->sm_scale = sm_scale;
  *made = std::move(job);
  return ffi::Error::Success();
}

ffi::Error DecodeImpl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                      ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_indices,
                      ffi::Buffer<ffi::S32> num_seqs, ffi::Buffer<ffi::S32> page_offset,
                      ffi::ResultBuffer<ffi::F32> out, float sm_scale, int32_t isa) {
  std::shared_ptr<DecodeJob> job;
  if (ffi::Error e = make_decode_job(q, k_pages, v_pages, page_indices, page_offset, out, sm_scale, isa,
                                     "paged decode attention", &job);
      e.failure()) {
    return e;
  }
  const int64_t num_rows = q.dimensions()[0];
  if (kv_lens.element_count() != size_t(num_rows) || page_indices.dimensions()[0] != num_rows ||
      num_seqs.element_count() != 1) {
    return ffi::Error::InvalidArgument("paged decode attention: expected kv_lens [B], page_indices [B, Pmax], num_seqs [1]");
  }
  const int64_t max_len = job->pool.pages_per_seq * job->pool.page_size;
  const int64_t valid_rows = std::clamp<int64_t>(num_seqs.typed_data()[0], 0, num_rows);
  for (int64_t b = 0; b < num_rows; ++b) {
    const int32_t len = b < valid_rows ? int32_t(std::clamp<int64_t>(kv_lens.typed_data()[b], 0, max_len)) : 0;
    job->rows.push_back(DecodeRow{b, b, len});
  }
  job->run(thread_pool, q.dimensions()[1]);
  return ffi::Error::Success();
}

ffi::Error TreeImpl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                    ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_indices,
                    ffi::Buffer<ffi::PRED> tree_mask, ffi::Buffer<ffi::S32> page_offset,
                    ffi::ResultBuffer<ffi::F32> out, float sm_scale, int32_t isa) {
  std::shared_ptr<DecodeJob> job;
  if (ffi::Error e = make_decode_job(q, k_pages, v_pages, page_indices, page_offset, out, sm_scale, isa,
                                     "tree attention", &job);
      e.failure()) {
    return e;
  }
  const int64_t num_reqs = page_indices.dimensions()[0];
  auto md = tree_mask.dimensions();
  if (kv_lens.element_count() != size_t(num_reqs) || md.size() != 3 || md[0] != num_reqs || md[1] != md[2] ||
      q.dimensions()[0] != num_reqs * md[1]) {
    return ffi::Error::InvalidArgument("tree attention: expected q [B * N, H, D], kv_lens [B], page_indices [B, Pmax], "
                                       "tree_mask [B, N, N]");
  }
  const int64_t num_nodes = md[1];
  const int64_t max_len = job->pool.pages_per_seq * job->pool.page_size;
  const bool* mask = tree_mask.typed_data();
  std::vector<int32_t> depth(num_nodes);
  for (int64_t b = 0; b < num_reqs; ++b) {
    const bool* m = mask + b * num_nodes * num_nodes;
    const int32_t committed = int32_t(std::clamp<int64_t>(kv_lens.typed_data()[b], 0, max_len));
    for (int64_t i = 0; i < num_nodes; ++i) {  // depth: ancestors-or-self minus one (-1: no node)
      depth[i] = -1;
      for (int64_t j = 0; j < num_nodes; ++j) depth[i] += m[i * num_nodes + j];
    }
    for (int64_t i = 0; i < num_nodes; ++i) {
      DecodeRow row{b * num_nodes + i, b, 0, committed, int64_t(job->tails.size())};
      if (depth[i] >= 0) {  // its path by depth: the ancestor at depth t sits at position committed + t
        const int64_t first = int64_t(job->tails.size());
        job->tails.resize(size_t(first + depth[i] + 1), -1);
        for (int64_t j = 0; j < num_nodes; ++j) {
          if (m[i * num_nodes + j] && depth[j] >= 0 && depth[j] <= depth[i]) {
            job->tails[first + depth[j]] = int32_t(std::min<int64_t>(committed + j, max_len - 1));
          }
        }
        // a mask whose ancestors do not form one path (not a tree): such a node sees only the committed slots
        const bool path = std::none_of(job->tails.begin() + first, job->tails.end(), [](int32_t t) { return t < 0; });
        row.len = path ? int32_t(std::min<int64_t>(committed + depth[i] + 1, max_len)) : committed;
      }
      job->rows.push_back(row);
    }
  }
  job->run(thread_pool, q.dimensions()[1]);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Ragged (prefill chunks): several causal query rows per sequence.

struct RaggedItem {
  int32_t seq, kv_head, first, count;  // query tokens first..first+count-1 of the sequence
};

struct RaggedJob : Job {
  TileFn fn;
  Pool pool;
  const float* q;
  float* out;
  int64_t group;
  float sm_scale;
  std::vector<int32_t> lens, kv_lens_raw, q_start, q_len;  // per sequence: clamped and given kv_len, first row, rows
  std::vector<RaggedItem> items;

  void run_item(int64_t i) override {
    const RaggedItem& it = items[i];
    const int64_t d = pool.head_dim, num_heads = pool.num_kv_heads * group, h0 = it.kv_head * group;
    const int rows = int(it.count * group);
    Scratch& s = scratch();
    s.reserve(rows, int(d));
    int end = 0;
    for (int i_q = 0; i_q < it.count; ++i_q) {
      const int64_t token = q_start[it.seq] + it.first + i_q;
      // Position kv_len - q_len + i sees that many slots plus itself (never past the clamped kv_len).
      const int64_t pos = int64_t(kv_lens_raw[it.seq]) - q_len[it.seq] + it.first + i_q;
      const int limit = int(std::clamp<int64_t>(pos + 1, 0, lens[it.seq]));
      end = std::max(end, limit);
      for (int64_t g = 0; g < group; ++g) {
        const float* src = q + (token * num_heads + h0 + g) * d;
        float* dst = s.q.data() + (i_q * group + g) * d;
        for (int64_t e = 0; e < d; ++e) dst[e] = src[e] * sm_scale;
        s.limit[i_q * group + g] = limit;
      }
    }
    fn(pool.tile(it.seq, it.kv_head, s, rows, 0, end));
    for (int i_q = 0; i_q < it.count; ++i_q) {
      const int64_t token = q_start[it.seq] + it.first + i_q;
      for (int64_t g = 0; g < group; ++g) {
        const int r = int(i_q * group + g);
        float* o = out + (token * num_heads + h0 + g) * d;
        const float inv = s.l[r] > 0.0f ? 1.0f / s.l[r] : 0.0f;
        for (int64_t e = 0; e < d; ++e) o[e] = s.acc[r * d + e] * inv;
      }
    }
  }
};

ffi::Error RaggedImpl(ffi::ThreadPool thread_pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_pages,
                      ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_indices,
                      ffi::Buffer<ffi::S32> cu_q_lens, ffi::Buffer<ffi::S32> num_seqs,
                      ffi::Buffer<ffi::S32> page_offset, ffi::ResultBuffer<ffi::F32> out, float sm_scale,
                      int32_t isa) {
  auto qd = q.dimensions();
  if (qd.size() != 3) return ffi::Error::InvalidArgument("ragged paged attention: q must be [T, H, D]");
  const int64_t num_tokens = qd[0], num_heads = qd[1], head_dim = qd[2];
  auto job = std::make_shared<RaggedJob>();
  if (ffi::Error e = check_pool(k_pages, v_pages, page_indices, page_offset, num_heads, head_dim, &job->pool);
      e.failure()) {
    return e;
  }
  const int64_t max_seqs = page_indices.dimensions()[0];
  if (kv_lens.element_count() != size_t(max_seqs) || cu_q_lens.element_count() != size_t(max_seqs + 1) ||
      num_seqs.element_count() != 1) {
    return ffi::Error::InvalidArgument("ragged paged attention: expected kv_lens [B], cu_q_lens [B+1], num_seqs [1]");
  }
  if (ffi::Error e = pick_kernel(isa, k_pages.element_type(), int(head_dim), &job->fn); e.failure()) return e;
  const Pool& pool = job->pool;
  job->q = q.typed_data();
  job->out = out->typed_data();
  job->group = num_heads / pool.num_kv_heads;
  job->sm_scale = sm_scale;

  const int64_t max_len = pool.pages_per_seq * pool.page_size;
  const int64_t valid = std::clamp<int64_t>(num_seqs.typed_data()[0], 0, max_seqs);
  const int32_t* cu = cu_q_lens.typed_data();
  // Query tokens per item: fill a tile with whole tokens (G heads each).
  const int32_t block_q = int32_t(std::max<int64_t>(1, kMaxRows / job->group));
  int64_t covered = 0, total = 0;
  for (int64_t b = 0; b < valid; ++b) {
    const int64_t start = std::clamp<int64_t>(cu[b], covered, num_tokens);
    const int64_t stop = std::clamp<int64_t>(cu[b + 1], start, num_tokens);
    const int32_t len = int32_t(std::clamp<int64_t>(kv_lens.typed_data()[b], 0, max_len));
    // Rows between sequences (cu not contiguous) are zero.
    if (start > covered) std::memset(job->out + covered * num_heads * head_dim, 0, sizeof(float) * (start - covered) * num_heads * head_dim);
    job->lens.push_back(len);
    job->kv_lens_raw.push_back(kv_lens.typed_data()[b]);
    job->q_start.push_back(int32_t(start));
    job->q_len.push_back(int32_t(stop - start));
    for (int64_t h = 0; h < pool.num_kv_heads; ++h) {
      for (int64_t first = 0; first < stop - start; first += block_q) {
        const int32_t count = int32_t(std::min<int64_t>(block_q, stop - start - first));
        job->items.push_back(RaggedItem{int32_t(b), int32_t(h), int32_t(first), count});
      }
    }
    total += (stop - start) * int64_t(len) * pool.num_kv_heads / 2 + 1;
    covered = stop;
  }
  if (covered < num_tokens) {
    std::memset(job->out + covered * num_heads * head_dim, 0, sizeof(float) * (num_tokens - covered) * num_heads * head_dim);
  }
  // Longest first: an item reads the slots up to its last query token's position.
  auto reach = [&job](const RaggedItem& it) {
    return int64_t(job->kv_lens_raw[it.seq]) - job->q_len[it.seq] + it.first + it.count;
  };
  std::stable_sort(job->items.begin(), job->items.end(),
                   [&reach](const RaggedItem& a, const RaggedItem& b) { return reach(a) > reach(b); });
  job->num_items = int64_t(job->items.size());
  run_job(thread_pool, job, total >= kMinParallelSlots);
  return ffi::Error::Success();
}

}  // namespace jaxinfer_attention

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_paged_decode_attention, jaxinfer_attention::DecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, H, D]
                                  .Arg<ffi::AnyBuffer>()         // k_pages [K, P, L, D]
                                  .Arg<ffi::AnyBuffer>()         // v_pages [K, P, L, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_indices [B, Pmax]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_seqs [1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_offset [1]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [B, H, D]
                                  .Attr<float>("sm_scale")
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_tree_attention, jaxinfer_attention::TreeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [B * N, H, D]
                                  .Arg<ffi::AnyBuffer>()          // k_pages [K, P, L, D]
                                  .Arg<ffi::AnyBuffer>()          // v_pages [K, P, L, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_lens [B] committed
                                  .Arg<ffi::Buffer<ffi::S32>>()   // page_indices [B, Pmax]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // tree_mask [B, N, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // page_offset [1]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [B * N, H, D]
                                  .Attr<float>("sm_scale")
                                  .Attr<int32_t>("isa"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_ragged_paged_attention, jaxinfer_attention::RaggedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [T, H, D]
                                  .Arg<ffi::AnyBuffer>()         // k_pages [K, P, L, D]
                                  .Arg<ffi::AnyBuffer>()         // v_pages [K, P, L, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_lens [B]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_indices [B, Pmax]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cu_q_lens [B+1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // num_seqs [1]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_offset [1]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [T, H, D]
                                  .Attr<float>("sm_scale")
                                  .Attr<int32_t>("isa"));

// Which isa codes (bit 1 << isa) this host runs: for the Python wrapper and the tests.
extern "C" __attribute__((visibility("default"))) int jaxinfer_paged_attention_isas() {
  int mask = 0;
  for (int32_t isa : {jaxinfer_attention::kScalar, jaxinfer_attention::kAvx2, jaxinfer_attention::kAvx512}) {
    if (jaxinfer_attention::host_supports(isa)) mask |= 1 << isa;
  }
  return mask;
}

#else  // JAXINFER_ATTENTION_BODY: the kernel, compiled once per ISA (JAXINFER_OPS, JAXINFER_TARGET)

namespace jaxinfer_attention {
namespace JAXINFER_NS {

using V = JAXINFER_OPS;
using R = V::R;

// Scores s[g * stride + j] of NG query rows q [NG, D] against n consecutive slots k [n, D]. Four
// slots at a time (when the registers allow: NG * 4 accumulators) share one horizontal reduction.
template <class T, int NG>
JAXINFER_TARGET inline void scores(const float* q, int head_dim, const T* k, int n, float* s, int stride) {
  constexpr int kSlots = (V::W == 1 || (V::W == 8 && NG > 2)) ? 1 : 4;
  int j = 0;
  if (kSlots == 4) {
    for (; j + 4 <= n; j += 4, k += 4 * head_dim) {
      R acc[NG][4];
      for (int g = 0; g < NG; ++g)
        for (int i = 0; i < 4; ++i) acc[g][i] = V::zero();
      for (int d = 0; d < head_dim; d += V::W) {
        R kv[4];
        for (int i = 0; i < 4; ++i) kv[i] = V::load_kv(k + i * head_dim + d);
        for (int g = 0; g < NG; ++g) {
          const R qv = V::load(q + g * head_dim + d);
          for (int i = 0; i < 4; ++i) acc[g][i] = V::fma(qv, kv[i], acc[g][i]);
        }
      }
      for (int g = 0; g < NG; ++g) V::hsum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3], s + g * stride + j);
    }
  }
  for (; j < n; ++j, k += head_dim) {
    R acc[NG];
    for (int g = 0; g < NG; ++g) acc[g] = V::zero();
    for (int d = 0; d < head_dim; d += V::W) {
      const R kv = V::load_kv(k + d);
      for (int g = 0; g < NG; ++g) acc[g] = V::fma(V::load(q + g * head_dim + d), kv, acc[g]);
    }
    for (int g = 0; g < NG; ++g) s[g * stride + j] = V::hsum(acc[g]);
  }
}

// acc [NG, D] += sum_j p[g * stride + j] * v[j] over n consecutive slots v [n, D]; NB vectors of
// every row's accumulator stay in registers while the slots stream past.
template <class T, int NG, int NB>
JAXINFER_TARGET inline void accumulate_span(const float* p, int stride, const T* v, int n, int head_dim, int d,
                                            float* acc) {
  R a[NG][NB];
  for (int g = 0; g < NG; ++g)
    for (int b = 0; b < NB; ++b) a[g][b] = V::load(acc + g * head_dim + d + b * V::W);
  const T* vj = v + d;
  for (int j = 0; j < n; ++j, vj += head_dim) {
    R x[NB];
    for (int b = 0; b < NB; ++b) x[b] = V::load_kv(vj + b * V::W);
    for (int g = 0; g < NG; ++g) {
      const R w = V::set1(p[g * stride + j]);
      for (int b = 0; b < NB; ++b) a[g][b] = V::fma(w, x[b], a[g][b]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int b = 0; b < NB; ++b) V::store(acc + g * head_dim + d + b * V::W, a[g][b]);
}

template <class T, int NG>
JAXINFER_TARGET inline void accumulate(const float* p, int stride, const T* v, int n, int head_dim, float* acc) {
  int d = 0;
  for (; d + V::RB * V::W <= head_dim; d += V::RB * V::W) accumulate_span<T, NG, V::RB>(p, stride, v, n, head_dim, d, acc);
  for (; d < head_dim; d += V::W) accumulate_span<T, NG, 1>(p, stride, v, n, head_dim, d, acc);
}

template <class T>
JAXINFER_TARGET inline void scores_rows(const float* q, int rows, int head_dim, const T* k, int n, float* s, int stride) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) scores<T, 4>(q + r * head_dim, head_dim, k, n, s + r * stride, stride);
  switch (rows - r) {
    case 3: scores<T, 3>(q + r * head_dim, head_dim, k, n, s + r * stride, stride); break;
    case 2: scores<T, 2>(q + r * head_dim, head_dim, k, n, s + r * stride, stride); break;
    case 1: scores<T, 1>(q + r * head_dim, head_dim, k, n, s + r * stride, stride); break;
    default: break;
  }
}

template <class T>
JAXINFER_TARGET inline void accumulate_rows(const float* p, int stride, int rows, const T* v, int n, int head_dim,
                                            float* acc) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) accumulate<T, 4>(p + r * stride, stride, v, n, head_dim, acc + r * head_dim);
  switch (rows - r) {
    case 3: accumulate<T, 3>(p + r * stride, stride, v, n, head_dim, acc + r * head_dim); break;
    case 2: accumulate<T, 2>(p + r * stride, stride, v, n, head_dim, acc + r * head_dim); break;
    case 1: accumulate<T, 1>(p + r * stride, stride, v, n, head_dim, acc + r * head_dim); break;
    default: break;
  }
}

// p[0:n] = exp(s[0:n] - m) in place; returns their sum.
JAXINFER_TARGET inline float exp_shifted(float* s, int n, float m) {
  const R mv = V::set1(m);
  R sum = V::zero();
  int j = 0;
  for (; j + V::W <= n; j += V::W) {
    const R e = V::exp(V::sub(V::load(s + j), mv));
    V::store(s + j, e);
    sum = V::add(sum, e);
  }
  float total = V::hsum(sum);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    total += s[j];
  }
  return total;
}

JAXINFER_TARGET inline float row_max(const float* s, int n) {
  float best = -std::numeric_limits<float>::infinity();
  int j = 0;
  if (n >= V::W) {
    R mv = V::load(s);
    for (j = V::W; j + V::W <= n; j += V::W) mv = V::max(mv, V::load(s + j));
    best = V::hmax(mv);
  }
  for (; j < n; ++j) best = std::max(best, s[j]);
  return best;
}

template <class T>
JAXINFER_TARGET void attend(const Tile& t) {
  const int head_dim = t.head_dim, page_size = t.page_size, rows = t.rows;
  const T* k_pool = static_cast<const T*>(t.k);
  const T* v_pool = static_cast<const T*>(t.v);
  const int block = std::max(1, kBlockSlots / page_size) * page_size;  // slots per softmax block
  thread_local std::vector<float> score_buffer;
  if (score_buffer.size() < size_t(rows) * block) score_buffer.resize(size_t(rows) * block);
  float* s = score_buffer.data();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < rows; ++r) {
    t.m[r] = neg_inf;
    t.l[r] = 0.0f;
  }
  std::fill(t.acc, t.acc + size_t(rows) * head_dim, 0.0f);
  auto page_start = [&](int position) -> int64_t {  // element offset of the position's slot in the pool
    const int slot = position < t.tail_begin ? position : t.tail_slots[position - t.tail_begin];
    int64_t page = int64_t(t.pages[slot / page_size]) + t.page_offset;
    page = std::min<int64_t>(std::max<int64_t>(page, 0), t.num_pages - 1);
    return (page * page_size + slot % page_size) * head_dim;
  };
  // A run of positions within one page, as decode reads it: where it lies in the pool, or (a run
  // reaching into a tree node's path, whose slots are not consecutive) copied into a buffer in
  // position order, so that the scores and sums run exactly as over the committed run.
  thread_local std::vector<T> run_k, run_v;
  auto run_data = [&](int position, int count, int scored, const T** k, const T** v) {
    if (position + scored <= t.tail_begin) {
      *k = k_pool + page_start(position);
      *v = v_pool + page_start(position);
      return;
    }
    run_k.assign(size_t(scored) * head_dim, T{});
    run_v.assign(size_t(scored) * head_dim, T{});
    for (int j = 0; j < count; ++j) {
      const int64_t start = page_start(position + j);
      std::memcpy(run_k.data() + size_t(j) * head_dim, k_pool + start, sizeof(T) * head_dim);
      std::memcpy(run_v.data() + size_t(j) * head_dim, v_pool + start, sizeof(T) * head_dim);
    }
    *k = run_k.data();
    *v = run_v.data();
  };
  // Slots are scored four at a time from the page's start (one reduction per slot, the same whatever
  // the run's length): a run is scored up to its next multiple of four inside the page, the extra
  // slots' scores never read. So a slot's score does not depend on how far the tile reaches.
  auto scored_count = [&](int position, int count) {
    return page_size % 4 ? count : std::min(page_size - position % page_size, (count + 3) / 4 * 4);
  };
  // Pages lie anywhere in the pool, so the hardware prefetcher stops at every page end: fetch
  // the next block's keys and values while this block is computed.
  const int line_elems = std::max<int>(1, 64 / int(sizeof(T)));
  auto prefetch_block = [&](int b0) {
    const int n = std::min(block, t.end - b0);
    for (int off = 0; off < n;) {
      const int count = std::min(page_size - (b0 + off) % page_size, n - off);
      const int64_t start = page_start(b0 + off);
      for (int e = 0; e < count * head_dim; e += line_elems) {
        __builtin_prefetch(k_pool + start + e);
        __builtin_prefetch(v_pool + start + e);
      }
      off += count;
    }
  };
  if (t.begin < t.end) prefetch_block(t.begin);
  for (int b0 = t.begin; b0 < t.end; b0 += block) {
    const int n = std::min(block, t.end - b0);
    if (b0 + block < t.end) prefetch_block(b0 + block);
    for (int off = 0; off < n;) {
      const int count = std::min(page_size - (b0 + off) % page_size, n - off);
      const int scored = scored_count(b0 + off, count);
      const T* k_run;
      const T* v_run;
      run_data(b0 + off, count, scored, &k_run, &v_run);
      scores_rows<T>(t.q, rows, head_dim, k_run, scored, s + off, block);
      off += count;
    }
    for (int r = 0; r < rows; ++r) {
      float* sr = s + r * block;
      const int visible = std::min(n, std::max(0, t.limit[r] - b0));
      if (visible == 0) {
        std::fill(sr, sr + n, 0.0f);
        continue;
      }
      const float m_new = std::max(t.m[r], row_max(sr, visible));
      const float alpha = t.m[r] == neg_inf ? 0.0f : std::exp(t.m[r] - m_new);
      const float sum = exp_shifted(sr, visible, m_new);
      std::fill(sr + visible, sr + n, 0.0f);
      t.l[r] = t.l[r] * alpha + sum;
      t.m[r] = m_new;
      if (alpha != 1.0f) {
        float* a = t.acc + r * head_dim;
        const R av = V::set1(alpha);
        for (int d = 0; d < head_dim; d += V::W) V::store(a + d, V::mul(V::load(a + d), av));
      }
    }
    for (int off = 0; off < n;) {
      const int count = std::min(page_size - (b0 + off) % page_size, n - off);
      const T* k_run;
      const T* v_run;
      run_data(b0 + off, count, scored_count(b0 + off, count), &k_run, &v_run);
      accumulate_rows<T>(s + off, block, rows, v_run, count, head_dim, t.acc);
      off += count;
    }
  }
}

}  // namespace JAXINFER_NS
}  // namespace jaxinfer_attention

#endif  // JAXINFER_ATTENTION_BODY
