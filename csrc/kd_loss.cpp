// Fused knowledge-distillation loss on CPU tensors: rows in parallel, three vectorised passes per row.
//
// Per row (student s, teacher t, label y, weight w, temperature T, distillation weight a), with
//   m = max s, mt = max t, e1_c = exp(s_c - m), eT_c = exp(v_c), eu_c = exp(u_c), v = (s - m)/T, u = (t - mt)/T,
//   Z1 = sum e1, ZT = sum eT, Zt = sum eu   (softmax(s) = e1/Z1, p = softmax(s/T) = eT/ZT, q = eu/Zt):
//   ce  = -log softmax(s)_y = log Z1 - (s_y - m)
//   kl  = sum_c q_c (log q_c - log p_c) = (sum_c eu_c (u_c - v_c)) / Zt - log Zt + log ZT
//         (a class with eu_c = 0, i.e. a teacher logit of -inf, adds exactly 0)
//   h_c = d l / d s_c = w ((1 - a)(e1_c/Z1 - [c = y]) + a T (eT_c/ZT - eu_c/Zt)),  gradient = scale * h
//   loss = w ((1 - a) ce + a T^2 kl)  (Hinton et al. 2015, "Distilling the knowledge in a neural network")
// scale is the reduction's factor (1 / n for the mean), so the backward has nothing left to do for an upstream 1;
// the reduction itself sums the rows in row order after the parallel loop (deterministic).
// Pass 1 finds the maxima; pass 2 computes the exponentials into a row-sized fp32 scratch and sums them;
// pass 3 writes the gradient and sums its squares. The label's class is masked out of every sum and treated
// apart: 1 - softmax(s)_y = (sum of the other classes' e1) / Z1 then keeps its relative precision on
// confidently right rows, and so do ce, el2n, grad_norm and the gradient's y entry. Sums run in fp32 vector
// lanes within blocks of kSumBlock elements and in double across blocks (C up to 262144 and beyond).
#include "kd_loss.h"

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace kdfast {
namespace {

#if defined(__GNUC__)
#define KD_INLINE inline __attribute__((always_inline))
#define KD_LAMBDA_INLINE __attribute__((always_inline))  // (else a lambda is compiled for the baseline target)
#else
#define KD_INLINE inline
#define KD_LAMBDA_INLINE
#endif

// The row kernel is compiled for AVX-512, AVX2 + FMA and the x86-64 baseline; the dynamic loader picks the
// best one for the CPU it runs on (a locally built wheel must still run on an older machine). The x86-64-v3/v4
// levels need GCC 11; other compilers build the baseline alone.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define KD_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KD_TARGET_CLONES
#endif

constexpr int64_t kSumBlock = 512;          // elements summed in fp32 lanes before the sum moves to double
constexpr int64_t kParallelGrain = 16384;   // elements per parallel task: below it threads cost more than they save
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int kNumStats = 6;                // ce, kl, el2n, grad_norm, correct, margin
enum Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2 };

// The row kernel works on chunks of kLanes classes held in GCC/Clang vector types: the accumulators stay in
// vector registers across a whole row (an `omp simd` loop per pass and chunk range reduced its lanes through
// memory at every call, ~100 ns per row, the fixed cost that dominated rows of 10 or 100 classes), and one
// source serves every target_clones level (baseline: two SSE registers per vector). 8 lanes, one ymm register:
// 16 spilled AVX2's 16 registers (3x the instructions per row), and Zen 4 runs a zmm operation as two ymm
// halves anyway. A row of 10 classes wastes less work in 8-lane chunks than in 16-lane ones.
constexpr int64_t kLanes = 8;
#if defined(__GNUC__) && !defined(__clang__)
// (vector values pass only between always-inline functions of this file: no call crosses the ABI it warns of)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
static_assert(kSumBlock % kLanes == 0, "a sum block holds whole chunks");
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t VecI __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint32_t VecU __attribute__((vector_size(kLanes * sizeof(uint32_t))));

KD_INLINE VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
KD_INLINE void store(float* p, VecF v) { std::memcpy(p, &v, sizeof v); }
KD_INLINE VecF splat(float x) { return VecF{} + x; }
// where mask (all ones / zeros per lane, as comparisons return): a, else b
KD_INLINE VecF select(VecI mask, VecF a, VecF b) { return mask ? a : b; }  // (a blend, not bit logic)
KD_INLINE VecF vmax(VecF a, VecF b) { return select(a > b, a, b); }

// Sum, maximum and bitwise or of the lanes as a tree (depth log2(kLanes), where a running scalar chain waits
// on every lane; a fixed order: deterministic).
template <typename T, typename V, typename Op>
KD_INLINE T reduce_lanes(V v, Op op) {
  T s[kLanes];
  std::memcpy(s, &v, sizeof s);
  for (int64_t w = kLanes / 2; w >= 1; w /= 2)
    for (int64_t j = 0; j < w; ++j) s[j] = op(s[j], s[j + w]);
  return s[0];
}
KD_INLINE float hsum(VecF v) {
  return reduce_lanes<float>(v, [](float a, float b) KD_LAMBDA_INLINE { return a + b; });
}
KD_INLINE float hmax(VecF v) {
  return reduce_lanes<float>(v, [](float a, float b) KD_LAMBDA_INLINE { return a > b ? a : b; });
}
KD_INLINE bool any(VecI v) {
  return reduce_lanes<int32_t>(v, [](int32_t a, int32_t b) KD_LAMBDA_INLINE { return a | b; }) != 0;
}

// 2^x for x in [kMinExp2, 0] (exponents in base 2: the callers fold log2(e) and 1/T into one factor, so each
// exponential costs one multiply where a natural-base exp needs a two-constant reduction). x = n + f, n the
// nearest integer, f in [-1/2, 1/2] exact; 2^f by a degree-6 polynomial (relative error 1.0e-7 evaluated in
// fp32: below one ulp of the sums), 2^n from n's bits, which adding 1.5 * 2^23 leaves in the mantissa's low
// bits (no float-to-int conversion). At x = kMinExp2, 2^n's bits are exactly 0, so the result is exactly 0: a
// logit of -inf (clamped there) gives q = 0, and exp(0) is exactly 1.
constexpr float kMinExp2 = -127.0f;
constexpr double kLog2eD = 1.4426950408889634;
constexpr float kLog2e = static_cast<float>(kLog2eD);
constexpr double kLn2 = 0.69314718055994530942;
KD_INLINE VecF exp2_clamped(VecF x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const VecF t = x + kRound;
  const VecF f = x - (t - kRound);
  // Estrin's scheme, 1 + f (a + f^2 (b + f^2 c)) with a, b, c linear in f: 4 dependent multiply-adds where
  // Horner chains 6 (a shorter chain per chunk: 4% off the kernel at 128 x 100)
  const VecF f2 = f * f;
  const VecF a = f * 2.4022647738e-1f + 6.9314724207e-1f;
  const VecF b = f * 9.6183242276e-3f + 5.5503021926e-2f;
  const VecF c = f * 1.5394062211e-4f + 1.3408146333e-3f;
  const VecF p = f * (f2 * (f2 * c + b) + a) + 1.0f;
  const VecU pow2n = ((VecU)t << 23) + (127u << 23);  // (t's exponent and leading bits shift out)
  return p * (VecF)pow2n;
}
KD_INLINE VecF clamp_exp2_arg(VecF x) { return vmax(x, splat(kMinExp2)); }  // (-inf -> kMinExp2; never NaN here)
KD_INLINE VecF exp2_nonpos(VecF x) { return exp2_clamped(clamp_exp2_arg(x)); }

// x^(2^N), N squarings: exp(d) = exp(d / T)^T for T = 2^N, N multiplies instead of an exponential, at T times
// the exponential's relative error
template <int N>
KD_INLINE VecF square_n(VecF x) {
  for (int i = 0; i < N; ++i) x *= x;
  return x;
}

static_assert(kLanes == 8, "kIota lists kLanes lanes");
constexpr VecI kIota = {0, 1, 2, 3, 4, 5, 6, 7};

struct RowConsts {
  int64_t C;
  float alpha, temperature;
  float log2e_T;  // log2(e) / T: (s - m) times it is the tempered exponent in base 2
  int squarings;  // log2(T) for T = 1, 2, 4 or 8 (exp(s - m) from exp((s - m) / T) squared), else -1
  bool stats;     // the statistics are wanted (el2n and grad_norm cost sums of squares the loss does not need)
};
// Up to T = 8 the squarings' rounding stays within ~1e-6 relative (T = 4, the usual choice: 5e-7); any other
// temperature computes exp(s - m) by its own exponential. (A compile-time count: a runtime power cost more
// instructions per chunk than the exponential it saves.)
constexpr int kMaxSquarings = 3;

// Loss, then the kNumStats statistics (ce, kl, el2n, grad_norm, correct, margin) of one row.
constexpr int kOut = 1 + kNumStats;

KD_INLINE int64_t padded(int64_t C) { return (C + kLanes - 1) / kLanes * kLanes; }

// The kinds of chunk a row of C classes is cut into (compile-time tags: no per-chunk test in the loops).
struct Whole {};    // kLanes classes in place, at base 0, kLanes, ..., all new
struct Overlap {};  // C >= kLanes, C % kLanes != 0: the row's last kLanes classes in place (base C - kLanes: no
                    // copy, no read past the row); only the lanes past the chunk before are new
struct Narrow {};   // C < kLanes: the row copied into a buffer padded with -inf (exp(-inf) = 0 adds nothing)

// A row of the student or the teacher: its memory, and what its last chunk needs.
struct RowView {
  const float* x;
  VecI fresh;          // Overlap: the new lanes
  float pad[kLanes];   // Narrow: the row, then -inf
  RowView(const float* row, int64_t C) : x(row) {
    if (C >= kLanes) {
      fresh = kIota >= static_cast<int32_t>(kLanes - C % kLanes);
    } else {
      for (int64_t j = 0; j < kLanes; ++j) pad[j] = j < C ? row[j] : -kInf;
    }
  }
  const float* chunk(int64_t base, Whole) const { return x + base; }
  const float* chunk(int64_t base, Overlap) const { return x + base; }
  const float* chunk(int64_t, Narrow) const { return pad; }
  // the lanes of a chunk that are new to the row's sums
  VecF new_lanes(VecF v, Whole) const { return v; }
  VecF new_lanes(VecF v, Overlap) const { return select(fresh, v, VecF{}); }
  VecF new_lanes(VecF v, Narrow) const { return v; }
};

// Calls body(base, kind) for the chunks of a row of C classes: the whole ones, then the partial rest if any
// (Overlap, or Narrow below kLanes classes), and flush() after every kSumBlock classes and after the last
// chunk: sums run in fp32 lanes within a block and in double across them.
template <typename Body, typename Flush>
KD_INLINE void for_chunks(int64_t C, Body&& body, Flush&& flush) {
  const int64_t C_full = C - C % kLanes;
  for (int64_t b0 = 0; b0 < C; b0 += kSumBlock) {
    const int64_t end = std::min(C_full, b0 + kSumBlock);
    for (int64_t b = b0; b < end; b += kLanes) body(b, Whole{});
    if (b0 + kSumBlock >= C && C_full < C) {
      if (C_full > 0) body(C - kLanes, Overlap{});
      else body(int64_t{0}, Narrow{});
    }
    flush();
  }
}

// The lanes of the chunk at class `base` that hold the label y, from iota_y = kIota - y (per row): one
// broadcast and one compare per chunk. (Rows have fewer than 2^31 classes: checked at entry.)
KD_INLINE VecI label_lanes(VecI iota_y, int64_t base) { return iota_y == -static_cast<int32_t>(base); }

// A row whose student logits hold NaN or +inf, or no finite value: softmax is undefined, so the loss, the
// gradient and every statistic are NaN, except `correct`, which is 0 (no prediction to be right about).
KD_INLINE void poison_row(int64_t C, float* g, float* out) {
  std::fill(out, out + kOut, kNaN);
  out[5] = 0.0f;
  if (g) std::fill(g, g + C, kNaN);
}

struct ExpSums {
  double z1 = 0, sq1 = 0, zT = 0, zt = 0, kl = 0;  // over the classes but the label: e1, e1^2; all: eT, eu, eu (u - v)
};

// One row with a label in [0, C), after pass 1 (maxima and checks). sv, tv: the fp32 student and teacher rows;
// max_other: the student's maximum over the classes but the label, m = max(max_other, s_y) finite; scratch:
// 3 padded(C) floats; g: fp32 gradient row (not in scratch) or nullptr. g may be the student itself (in place):
// pass 3 never reads the student. The overlapping last chunk rewrites its old lanes' exponentials and gradient
// entries with the same values (the same inputs, the same operations) and leaves them out of the sums. The
// label's class (its lanes found from iota_y = kIota - y) is masked out of the sums and treated apart, so
// 1 - softmax(s)_y = (sum of the other classes' e1) / Z1 keeps its relative precision on confidently right
// rows, and so do ce, el2n, grad_norm and the gradient's y entry.
// HAS_TEACHER: the teacher is used; it is finite or -inf everywhere, with the finite maximum mt.
template <bool HAS_TEACHER, bool WRITE_GRAD, int SQUARINGS>
KD_INLINE void kd_row_impl(const RowConsts& k, const RowView& sv, const RowView& tv, float max_other, float m,
                           float mt, int64_t y, VecI iota_y, float s_y, float w, float scale, float* scratch,
                           float* g, float* out) {
  const int64_t C = k.C, P = padded(C);
  float* e1 = scratch;
  float* eT = scratch + P;
  float* eu = scratch + 2 * P;
  // Pass 2: exponentials (base 2) and their sums.
  ExpSums acc;
  VecF z1{}, sq1{}, zT{}, zt{}, kl{};
  const VecF vm = splat(m), vmt = splat(mt), log2e_T = splat(k.log2e_T), log2e = splat(kLog2e);
  for_chunks(
      C,
      [&](int64_t b, auto part) KD_LAMBDA_INLINE {
        const VecF d = load(sv.chunk(b, part)) - vm;
        VecF x1;
        if constexpr (HAS_TEACHER) {
          const VecF v = d * log2e_T, u = clamp_exp2_arg((load(tv.chunk(b, part)) - vmt) * log2e_T);
          const VecF xT = exp2_nonpos(v), xu = exp2_clamped(u);
          if constexpr (SQUARINGS >= 0) x1 = square_n<SQUARINGS>(xT);
          else x1 = exp2_nonpos(d * log2e);
          store(eT + b, xT);
          store(eu + b, xu);
          zT += sv.new_lanes(xT, part);
          zt += sv.new_lanes(xu, part);
          kl += sv.new_lanes(select(xu > 0.0f, xu * (u - v), VecF{}), part);  // q = 0 adds 0, never 0 * inf
        } else {
          x1 = exp2_nonpos(d * log2e);
        }
        store(e1 + b, x1);
        const VecF xo = sv.new_lanes(select(label_lanes(iota_y, b), VecF{}, x1), part);
        z1 += xo;
        if (k.stats) sq1 += xo * xo;
      },
      [&]() KD_LAMBDA_INLINE {
        acc.z1 += hsum(z1), acc.sq1 += hsum(sq1);
        z1 = sq1 = VecF{};
        if constexpr (HAS_TEACHER) {
          acc.zT += hsum(zT), acc.zt += hsum(zt), acc.kl += hsum(kl);
          zT = zt = kl = VecF{};
        }
      });
  acc.kl *= kLn2;  // (u - v) was in base 2
  const double z1_all = acc.z1 + e1[y], inv_z1 = 1.0 / z1_all, inv_zt = 1.0 / acc.zt;  // (reused below)
  const double one_minus_sm_y = acc.z1 * inv_z1;
  // (float logarithms: within an ulp of the fp32 results, at a third of the double ones' cost per row)
  const double ce = s_y == m ? std::log1p(float(acc.z1)) : std::log(float(z1_all)) + (double(m) - double(s_y));
  const double kl_row = HAS_TEACHER ? acc.kl * inv_zt + std::log(float(acc.zT * inv_zt)) : double(kNaN);
  // A weight of exactly 0 or 1 drops its term (an infinite ce or kl times 0 would be NaN).
  const double ce_term = k.alpha == 1.0f ? 0.0 : (1.0 - k.alpha) * ce;
  const double kd_term = k.alpha == 0.0f ? 0.0 : double(k.alpha) * k.temperature * k.temperature * kl_row;
  out[0] = static_cast<float>(w * (ce_term + kd_term));
  // Pass 3: gradient h (the label's entry from the exact 1 - softmax(s)_y) and its norm.
  const float c1 = static_cast<float>(w * (1.0 - k.alpha) * inv_z1);
  float c2 = 0.0f, c3 = 0.0f, h_y = static_cast<float>(-w * (1.0 - k.alpha) * one_minus_sm_y);
  if (HAS_TEACHER) {
    const double kd = double(w) * k.alpha * k.temperature;
    c2 = static_cast<float>(kd / acc.zT);
    c3 = static_cast<float>(kd * inv_zt);
    h_y += c2 * eT[y] - c3 * eu[y];
  }
  if (!WRITE_GRAD && !k.stats) return;  // the loss alone
  float g_tail[kLanes];
  double sq = 0;
  VecF sq_lanes{};
  const VecF vc1 = splat(c1), vc2 = splat(c2), vc3 = splat(c3), vscale = splat(scale);
  for_chunks(
      C,
      [&](int64_t b, auto part) KD_LAMBDA_INLINE {
        VecF h = vc1 * load(e1 + b);
        if constexpr (HAS_TEACHER) h += vc2 * load(eT + b) - vc3 * load(eu + b);
        if (k.stats) sq_lanes += sv.new_lanes(select(label_lanes(iota_y, b), VecF{}, h * h), part);
        if constexpr (WRITE_GRAD) store(std::is_same_v<decltype(part), Narrow> ? g_tail : g + b, vscale * h);
      },
      [&]() KD_LAMBDA_INLINE {
        sq += hsum(sq_lanes);
        sq_lanes = VecF{};
      });
  if (WRITE_GRAD) {
    if (C < kLanes) std::copy(g_tail, g_tail + C, g);
    g[y] = scale * h_y;
  }
  if (!k.stats) return;
  sq += double(h_y) * h_y;
  const float margin = s_y - max_other;  // +inf when C == 1
  out[1] = static_cast<float>(ce);
  out[2] = static_cast<float>(kl_row);
  out[3] = static_cast<float>(std::sqrt(acc.sq1 * (inv_z1 * inv_z1) + one_minus_sm_y * one_minus_sm_y));
  out[4] = static_cast<float>(std::sqrt(sq));
  out[5] = margin > 0.0f ? 1.0f : 0.0f;
  out[6] = margin;
}

// One row with a label in [0, C) (scratch: 3 padded(C) floats, g not among them). Pass 1 finds the student's
// maximum over the classes but the label (for the margin), the teacher's maximum, and whether either holds NaN
// or +inf.
// Non-finite teacher logits (NaN, +inf, or none finite) make kl NaN, and so the loss, gradient and grad_norm
// too unless alpha == 0 (which never uses the teacher for them).
KD_TARGET_CLONES void kd_row(const RowConsts& k, const float* s, const float* t, int64_t y, float w, float scale,
                             float* scratch, float* g, float* out) {
  const RowView sv(s, k.C);
  const RowView tv(t ? t : s, k.C);
  const VecI iota_y = kIota - static_cast<int32_t>(y);
  VecF ms = splat(-kInf), mt = splat(-kInf);
  VecI bad_s{}, bad_t{};
  for_chunks(
      k.C,
      [&](int64_t b, auto part) KD_LAMBDA_INLINE {
        const VecF xs = load(sv.chunk(b, part));
        bad_s |= ~(xs < kInf);
        ms = vmax(ms, select(label_lanes(iota_y, b), splat(-kInf), xs));
        if (t) {
          const VecF xt = load(tv.chunk(b, part));
          bad_t |= ~(xt < kInf);
          mt = vmax(mt, xt);
        }
      },
      []() KD_LAMBDA_INLINE {});
  const float max_other = hmax(ms), s_y = s[y], m = std::max(max_other, s_y);
  const float m_t = hmax(mt);
  if (any(bad_s) || m == -kInf) return poison_row(k.C, g, out);
  // the row's variant, its flags as template arguments
  const auto run = [&](auto has_teacher, auto write_grad, auto squarings) KD_LAMBDA_INLINE {
    constexpr bool HT = decltype(has_teacher)::value;
    kd_row_impl<HT, decltype(write_grad)::value, decltype(squarings)::value>(
        k, sv, HT ? tv : sv, max_other, m, HT ? m_t : 0.0f, y, iota_y, s_y, w, scale, scratch, g, out);
  };
  const auto with_grad = [&](auto has_teacher, auto squarings) KD_LAMBDA_INLINE {
    g ? run(has_teacher, std::true_type{}, squarings) : run(has_teacher, std::false_type{}, squarings);
  };
  if (t && !any(bad_t) && m_t != -kInf) {
    switch (k.squarings) {
      case 0: return with_grad(std::true_type{}, std::integral_constant<int, 0>{});
      case 1: return with_grad(std::true_type{}, std::integral_constant<int, 1>{});
      case 2: return with_grad(std::true_type{}, std::integral_constant<int, 2>{});
      case 3: return with_grad(std::true_type{}, std::integral_constant<int, 3>{});
      default: return with_grad(std::true_type{}, std::integral_constant<int, -1>{});
    }
  }
  with_grad(std::false_type{}, std::integral_constant<int, -1>{});
  if (t != nullptr && k.alpha != 0.0f) {
    out[0] = out[4] = kNaN;
    if (g) std::fill(g, g + k.C, kNaN);
  }
}

// ------------------------------------------------------------ divergences and the sparse teacher
// reverse_kl and jsd against a dense teacher, and a sparse top-k teacher with any divergence, run this plain
// row kernel (scalar loops, exponentials and logarithms in double, sums in double); the default dense kl keeps
// the hand-vectorised kernel above, untouched. Formulas in kdfast/reference/kd_loss.py: the gradient w.r.t. a
// student logit in teacher bucket b is T p_c (h_b - sum p h) (kl: T (p_c - q_c)); a sparse teacher is k + 1
// buckets, its ids and the tail (the classes outside them, left out when k == C).
struct DivConsts {
  int divergence;       // 0 kl, 1 reverse_kl, 2 jsd
  double beta;          // jsd's teacher weight
  const int64_t* ids;   // (N, K) sparse teacher's class ids, or nullptr (dense teacher)
  const float* lp;      // (N, K) their log-probabilities at the capture temperature
  int64_t ids_stride, lp_stride, K;
  double ratio;         // capture temperature / T: the renormalised logprobs' scale at T
  bool tail;            // the teacher's tail bucket holds 1 - sum exp(lp) (else 0: renormalised)
};

// One bucket (student p, teacher q, their natural logarithms): the divergence's term, p h, and h. A
// probability of 0 adds 0 (never 0 * inf); the jsd's log m is a log-sum-exp, -inf only where p = q = 0.
struct DivTerm {
  double term, ph, h;
};
KD_INLINE DivTerm div_term(int divergence, double beta, double p, double q, double lp, double lq) {
  if (divergence == 0) return {q > 0 ? q * (lq - lp) : 0.0, 0.0, 0.0};
  if (divergence == 1) {
    const double h = lp - lq, ph = p > 0 ? p * h : 0.0;
    return {ph, ph, h};
  }
  const double a = lq + std::log(beta), b = lp + std::log1p(-beta), mx = std::max(a, b);
  const double lm = mx == -double(kInf) ? mx : mx + std::log(std::exp(a - mx) + std::exp(b - mx));
  const double h = (1.0 - beta) * (lp - lm), ph = p > 0 ? p * h : 0.0;
  return {beta * (q > 0 ? q * (lq - lm) : 0.0) + ph, ph, h};
}

// One row with a label in [0, C). scratch: 3 padded(C) floats (softmax(s) | p | the teacher's q, then h);
// kbuf: 4 K doubles for a sparse teacher; g: fp32 gradient row or nullptr. i: the row (the sparse teacher's).
KD_TARGET_CLONES void div_row(const RowConsts& k, const DivConsts& dc, const float* s, const float* t, int64_t i,
                              int64_t y, float w, float scale, float* scratch, double* kbuf, float* g, float* out) {
  const int64_t C = k.C, P = padded(C);
  bool bad_s = false;
  float max_other = -kInf;
  for (int64_t c = 0; c < C; ++c) {
    bad_s |= !(s[c] < kInf);
    if (c != y) max_other = std::max(max_other, s[c]);
  }
  const float s_y = s[y], m = std::max(max_other, s_y);
  if (bad_s || m == -kInf) return poison_row(C, g, out);
  const double inv_T = 1.0 / k.temperature;
  float* sm = scratch;
  float* p = scratch + P;
  float* q = scratch + 2 * P;
  // the two exponentials per class in whole chunks by the kl kernel's base-2 polynomial (the bulk of a sparse
  // teacher's row), the rest one by one
  const VecF vm = splat(m), log2e = splat(kLog2e), log2e_T = splat(k.log2e_T);
  int64_t c0 = 0;
  for (; c0 + kLanes <= C; c0 += kLanes) {
    const VecF d = load(s + c0) - vm;
    store(sm + c0, exp2_nonpos(d * log2e));
    store(p + c0, exp2_nonpos(d * log2e_T));
  }
  for (int64_t c = c0; c < C; ++c) {
    const double d = double(s[c]) - m;
    sm[c] = float(std::exp(d));
    p[c] = float(std::exp(d * inv_T));
  }
  double z1 = 0, zT = 0;  // z1 over the classes but the label (1 - softmax(s)_y keeps its relative precision)
  for (int64_t c = 0; c < C; ++c) {
    z1 += c != y ? sm[c] : 0.0f;
    zT += p[c];
  }
  const double z1_all = z1 + sm[y], log_zT = std::log(zT), one_minus_sm_y = z1 / z1_all;
  double sq1 = 0;
  for (int64_t c = 0; c < C; ++c) {
    sm[c] = float(sm[c] / z1_all);
    p[c] = float(p[c] / zT);
    if (c != y) sq1 += double(sm[c]) * sm[c];
  }
  const double ce = s_y == m ? std::log1p(z1) : std::log(z1_all) + (double(m) - double(s_y));
  // The teacher: the divergence D, sum p h, and (sparse) the tail's coefficient.
  double D = 0, sum_ph = 0, a_out = 0;
  bool t_bad = false;
  const auto lp_of = [&](int64_t c) KD_LAMBDA_INLINE { return (double(s[c]) - m) * inv_T - log_zT; };
  if (t) {
    float mt = -kInf;
    for (int64_t c = 0; c < C; ++c) {
      t_bad |= !(t[c] < kInf);
      mt = std::max(mt, t[c]);
    }
    t_bad |= mt == -kInf;
    double zt = 0;
    for (int64_t c = 0; c < C; ++c) zt += std::exp((double(t[c]) - mt) * inv_T);
    const double log_zt = std::log(zt);
    for (int64_t c = 0; c < C; ++c) {
      const double lq = (double(t[c]) - mt) * inv_T - log_zt;
      const DivTerm d = div_term(dc.divergence, dc.beta, p[c], std::exp(lq), lp_of(c), lq);
      D += d.term, sum_ph += d.ph;
      q[c] = float(dc.divergence == 0 ? std::exp(lq) : d.h);  // what pass 3 needs
    }
  } else {
    const int64_t K = dc.K;
    const int64_t* ids = dc.ids + i * dc.ids_stride;
    const float* lpk = dc.lp + i * dc.lp_stride;
    double* Pk = kbuf;
    double* lPk = kbuf + K;
    double* lqk = kbuf + 2 * K;
    double* hk = kbuf + 3 * K;
    double lse = 0, mq = -double(kInf);
    if (!dc.tail) {  // renormalised over the k at T: softmax(ratio * logprobs)
      for (int64_t j = 0; j < K; ++j) mq = std::max(mq, dc.ratio * lpk[j]);
      if (mq == -double(kInf)) mq = 0;
      double zq = 0;
      for (int64_t j = 0; j < K; ++j) zq += std::exp(dc.ratio * lpk[j] - mq);
      lse = mq + std::log(zq);
    }
    double sum_P = 0, sum_q = 0;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t c = ids[j];
      const bool ok = c >= 0 && c < C;  // a bad id (unvalidated) has no mass: never a wild read
      lPk[j] = ok ? lp_of(c) : -double(kInf);
      Pk[j] = ok ? p[c] : 0.0;
      lqk[j] = dc.tail ? double(lpk[j]) : dc.ratio * lpk[j] - lse;
      sum_P += Pk[j], sum_q += std::exp(lqk[j]);
    }
    const bool has_tail = K < C;
    const double P_t = has_tail ? std::max(1.0 - sum_P, 0.0) : 0.0;
    const double Q_t = has_tail && dc.tail ? std::max(1.0 - sum_q, 0.0) : 0.0;
    for (int64_t j = 0; j < K; ++j) {
      const DivTerm d = div_term(dc.divergence, dc.beta, Pk[j], std::exp(lqk[j]), lPk[j], lqk[j]);
      D += d.term, sum_ph += d.ph, hk[j] = d.h;
    }
    const DivTerm d_t = div_term(dc.divergence, dc.beta, P_t, Q_t, std::log(P_t), std::log(Q_t));
    D += d_t.term, sum_ph += d_t.ph;
    if (dc.divergence == 0) a_out = 1.0 - (P_t > 0 ? Q_t / P_t : 0.0);
    else a_out = has_tail ? d_t.h - sum_ph : 0.0;
  }
  const bool kd_on = k.alpha != 0.0f;
  if (t_bad) D = kNaN;
  const double ce_term = k.alpha == 1.0f ? 0.0 : (1.0 - k.alpha) * ce;
  const double kd_term = kd_on ? double(k.alpha) * k.temperature * k.temperature * D : 0.0;
  out[0] = (t_bad && kd_on) ? kNaN : static_cast<float>(w * (ce_term + kd_term));
  // Pass 3: the gradient (into g, or into the q buffer when only its norm is wanted: a sparse teacher's
  // ids are rewritten after the dense pass, so the norm is summed over the final row)
  const bool grad_nan = kd_on && (t_bad || (dc.divergence == 1 && D == double(kInf)));
  const double c_ce = double(w) * (1.0 - k.alpha), c_kd = kd_on ? double(w) * k.alpha * k.temperature : 0.0;
  float* gr = g ? g : (t ? nullptr : q);
  double sq = 0;
  for (int64_t c = 0; c < C; ++c) {
    double kd;
    if (t) kd = dc.divergence == 0 ? double(p[c]) - q[c] : (p[c] > 0 ? p[c] * (q[c] - sum_ph) : 0.0);
    else kd = p[c] > 0 ? p[c] * a_out : 0.0;
    const double h = c_ce * (c == y ? -one_minus_sm_y : double(sm[c])) + (kd_on ? c_kd * kd : 0.0);
    if (gr) gr[c] = float(h);
    else sq += h * h;
  }
  if (!t) {
    const int64_t* ids = dc.ids + i * dc.ids_stride;
    for (int64_t j = 0; j < dc.K; ++j) {
      const int64_t c = ids[j];
      if (c < 0 || c >= C) continue;
      const double kd = dc.divergence == 0 ? kbuf[j] - std::exp(kbuf[2 * dc.K + j])
                                           : (kbuf[j] > 0 ? kbuf[j] * (kbuf[3 * dc.K + j] - sum_ph) : 0.0);
      gr[c] = float(c_ce * (c == y ? -one_minus_sm_y : double(sm[c])) + (kd_on ? c_kd * kd : 0.0));
    }
  }
  if (gr) {
    for (int64_t c = 0; c < C; ++c) {
      sq += double(gr[c]) * gr[c];
      if (g) g[c] = grad_nan ? kNaN : scale * gr[c];
    }
  }
  const float margin = s_y - max_other;
  out[1] = static_cast<float>(ce);
  out[2] = static_cast<float>(D);
  out[3] = static_cast<float>(std::sqrt(sq1 + one_minus_sm_y * one_minus_sm_y));
  out[4] = grad_nan ? kNaN : static_cast<float>(std::sqrt(sq));
  out[5] = margin > 0.0f ? 1.0f : 0.0f;
  out[6] = margin;
}

// ------------------------------------------------------------------------------------- dtype plumbing
template <typename T>
KD_TARGET_CLONES void to_fp32(const T* src, int64_t n, float* dst) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<float>(src[c]);
}

// fp32 -> bf16 / fp16 bits, rounded to nearest even, branch-free so the store loop vectorises (c10's
// conversions branch on NaN). NaN stays NaN; fp16 overflows to inf and keeps its subnormals.
KD_INLINE uint16_t bf16_bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, sizeof w);
  const uint32_t rounded = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? (w >> 16) | 0x40u : rounded);
}

// The FP16 library's fp16_ieee_from_fp32_value (as in c10): the fp32 adder does the rounding.
KD_INLINE uint16_t fp16_bits(float f) {
  const float to_inf = 0x1.0p+112f, to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * to_inf) * to_zero;
  uint32_t w;
  std::memcpy(&w, &f, sizeof w);
  const uint32_t shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  const uint32_t bias_bits = (bias >> 1) + 0x07800000u;
  float bias_value;
  std::memcpy(&bias_value, &bias_bits, sizeof bias_value);
  base = bias_value + base;
  uint32_t bits;
  std::memcpy(&bits, &base, sizeof bits);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

template <typename T>
KD_TARGET_CLONES void from_fp32(const float* src, int64_t n, T* dst) {
  static_assert(sizeof(T) == sizeof(uint16_t), "bf16 and fp16 only");
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);  // c10::Half / BFloat16 hold their bits as one uint16_t
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    out[c] = std::is_same_v<T, c10::BFloat16> ? bf16_bits(src[c]) : fp16_bits(src[c]);
  }
}

// A row as fp32: the tensor's own memory for fp32, else converted into `buf`.
template <typename T>
const float* fp32_row(const T* row, int64_t C, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    to_fp32(row, C, buf);
    return buf;
  }
}

template <typename T>
void fill_row(T* row, int64_t C, float value) {
  std::fill(row, row + C, static_cast<T>(value));
}

struct FwdArgs {
  RowConsts k;
  DivConsts dc;
  bool generic;  // divergence other than kl, or a sparse teacher: div_row
  const int64_t* target;
  int64_t target_stride, ignore_index, s_stride, t_stride, g_stride, N;
  const float* weight;
  int64_t weight_stride;
  float scale;
  float* rows;
  float* stats;  // (kNumStats, N) or nullptr
};

template <typename S, typename T>
void kd_loss_fwd_rows(const FwdArgs& a, const S* student, const T* teacher, S* grad) {
  const int64_t C = a.k.C;
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / C);
  at::parallel_for(0, a.N, grain, [&](int64_t begin, int64_t end) {
    // scratch: e1 | eT | eu (padded to whole chunks), then, where the student's dtype is narrower than fp32,
    // its fp32 gradient and row, and the teacher's fp32 row where its dtype is
    const int64_t P = padded(C);
    const int64_t extra = (std::is_same_v<S, float> ? 0 : P + C) + (std::is_same_v<T, float> ? 0 : C);
    std::vector<float> scratch(3 * P + extra);
    std::vector<double> kbuf(a.dc.ids ? 4 * a.dc.K : 0);
    float* g_buf = scratch.data() + 3 * P;
    float* s_buf = g_buf + (std::is_same_v<S, float> ? 0 : P);
    float* t_buf = s_buf + (std::is_same_v<S, float> ? 0 : C);
    float out[1 + kNumStats];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = a.target[i * a.target_stride];
      S* g_row = grad ? grad + i * a.g_stride : nullptr;
      if (y == a.ignore_index || y < 0 || y >= C) {
        // ignored rows contribute nothing; a label outside [0, C) makes its row NaN (never a wild read)
        const float fill = y == a.ignore_index ? 0.0f : kNaN;
        std::fill(out, out + 1 + kNumStats, fill);
        if (g_row) fill_row(g_row, C, fill);
      } else {
        const float w = a.weight ? a.weight[i * a.weight_stride] : 1.0f;
        const float* s = fp32_row(student + i * a.s_stride, C, s_buf);
        const float* t = teacher ? fp32_row(teacher + i * a.t_stride, C, t_buf) : nullptr;
        // fp32 writes straight into the output row; narrower dtypes go through g_buf
        float* g = nullptr;
        if (g_row) g = std::is_same_v<S, float> ? reinterpret_cast<float*>(g_row) : g_buf;
        if (a.generic) div_row(a.k, a.dc, s, t, i, y, w, a.scale, scratch.data(), kbuf.data(), g, out);
        else kd_row(a.k, s, t, y, w, a.scale, scratch.data(), g, out);
        if constexpr (!std::is_same_v<S, float>) {
          if (g_row) from_fp32(g, C, g_row);
        }
      }
      a.rows[i] = out[0];
      if (a.stats)
        for (int j = 0; j < kNumStats; ++j) a.stats[j * a.N + i] = out[1 + j];
    }
  });
}

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Calls f with a value of the C++ type of t (one of the kernel dtypes, checked before).
template <typename F>
void dispatch_kernel_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: TORCH_CHECK_VALUE(false, "kd_loss_fwd: unsupported dtype ", t);
  }
}

void check_rows_arg(const char* name, const at::Tensor& x, int64_t N, int64_t C) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "kd_loss_fwd: ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(is_kernel_dtype(x.scalar_type()), "kd_loss_fwd: ", name,
                    " must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == N && x.size(1) == C, "kd_loss_fwd: ", name, " must have shape (",
                    N, ", ", C, "), got ", x.sizes());
  TORCH_CHECK_VALUE(x.stride(1) == 1 || N == 0 || C == 1, "kd_loss_fwd: ", name,
                    " must have unit class stride (stride(1) == 1), got strides ", x.strides());
}

void check_per_row_arg(const char* name, const at::Tensor& x, int64_t N, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == dtype && x.dim() == 1 && x.size(0) == N,
                    "kd_loss_fwd: ", name, " must be a (", N, ",) ", dtype, " CPU tensor, got ", x.sizes(), " ",
                    x.scalar_type(), " on ", x.device());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, double alpha, double temperature, int64_t ignore_index,
    int64_t reduction, bool need_grad, bool return_stats, const std::optional<at::Tensor>& grad_out,
    bool validate, int64_t divergence, double beta, std::optional<double> normalizer,
    const std::optional<at::Tensor>& topk_ids, const std::optional<at::Tensor>& topk_logprobs, double topk_ratio,
    bool topk_tail) {
  TORCH_CHECK_VALUE(student.dim() == 2, "kd_loss_fwd: student must have shape (N, C), got ", student.sizes());
  const int64_t N = student.size(0), C = student.size(1);
  TORCH_CHECK_VALUE(C >= 1, "kd_loss_fwd: student must have at least one class, got shape ", student.sizes());
  TORCH_CHECK_VALUE(C <= std::numeric_limits<int32_t>::max(), "kd_loss_fwd: rows of at most 2^31 - 1 classes, got ",
                    C);
  check_rows_arg("student", student, N, C);
  if (teacher) check_rows_arg("teacher", *teacher, N, C);
  check_per_row_arg("target", target, N, at::kLong);
  if (weight) check_per_row_arg("weight", *weight, N, at::kFloat);
  TORCH_CHECK_VALUE(std::isfinite(alpha), "kd_loss_fwd: alpha must be a finite number, got ", alpha);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature),
                    "kd_loss_fwd: temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kMean,
                    "kd_loss_fwd: reduction must be 0 (none), 1 (sum) or 2 (mean), got ", reduction);
  TORCH_CHECK_VALUE(divergence >= 0 && divergence <= 2,
                    "kd_loss_fwd: divergence must be 0 (kl), 1 (reverse_kl) or 2 (jsd), got ", divergence);
  TORCH_CHECK_VALUE(beta > 0.0 && beta < 1.0, "kd_loss_fwd: beta must be in (0, 1), got ", beta);
  TORCH_CHECK_VALUE(!normalizer || (reduction == kMean && *normalizer > 0.0 && std::isfinite(*normalizer)),
                    "kd_loss_fwd: normalizer must be a finite number > 0 with reduction 2 (mean)");
  TORCH_CHECK_VALUE(topk_ids.has_value() == topk_logprobs.has_value() && !(topk_ids && teacher),
                    "kd_loss_fwd: a sparse teacher needs topk_ids and topk_logprobs, and no dense teacher");
  int64_t K = 0;
  if (topk_ids) {
    K = topk_ids->dim() == 2 ? topk_ids->size(1) : 0;
    TORCH_CHECK_VALUE(topk_ids->device().is_cpu() && topk_ids->scalar_type() == at::kLong && topk_ids->dim() == 2 &&
                      topk_ids->size(0) == N && K >= 1 && K <= C && (topk_ids->stride(1) == 1 || K == 1),
                      "kd_loss_fwd: topk_ids must be an (", N, ", k) int64 CPU tensor, 1 <= k <= ", C,
                      ", unit stride along k, got ", topk_ids->sizes(), " ", topk_ids->scalar_type());
    TORCH_CHECK_VALUE(topk_logprobs->device().is_cpu() && topk_logprobs->scalar_type() == at::kFloat &&
                      topk_logprobs->sizes() == topk_ids->sizes() && (topk_logprobs->stride(1) == 1 || K == 1),
                      "kd_loss_fwd: topk_logprobs must be a float32 CPU tensor shaped like topk_ids ",
                      topk_ids->sizes(), ", unit stride along k, got ", topk_logprobs->sizes(), " ",
                      topk_logprobs->scalar_type());
    TORCH_CHECK_VALUE(topk_ratio > 0.0 && std::isfinite(topk_ratio), "kd_loss_fwd: topk_ratio must be > 0, got ",
                      topk_ratio);
  }
  TORCH_CHECK_VALUE(teacher || topk_ids || alpha == 0.0, "kd_loss_fwd: teacher is None, which needs alpha == 0, "
                    "got ", alpha);

  // One read of the labels: the mean's count, and the bad labels (raised with validate, else NaN rows).
  const int64_t* y = target.const_data_ptr<int64_t>();
  const int64_t y_stride = target.stride(0);
  int64_t n_counted = 0, n_bad = 0, first_bad = -1;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t yi = y[i * y_stride];
    if (yi == ignore_index) continue;
    ++n_counted;
    if (yi < 0 || yi >= C) {
      if (n_bad++ == 0) first_bad = i;
    }
  }
  TORCH_CHECK_VALUE(!validate || n_bad == 0, "kd_loss: target must hold class indices in [0, ", C,
                    ") or ignore_index=", ignore_index, "; row ", first_bad, " has ",
                    first_bad >= 0 ? y[first_bad * y_stride] : 0, " (", n_bad, " bad rows in all)");
  // mean: the gradient carries 1 / n (n = rows not ignored, at least 1), so the backward has nothing to do
  // (or 1 / normalizer: the caller's count, e.g. over gradient-accumulation steps)
  const double inv_n = normalizer ? 1.0 / *normalizer : 1.0 / static_cast<double>(std::max<int64_t>(n_counted, 1));

  at::Tensor grad;  // undefined (None) unless need_grad, and so is stats unless return_stats
  if (need_grad) {
    if (grad_out) {
      check_rows_arg("grad_out", *grad_out, N, C);
      TORCH_CHECK_VALUE(grad_out->scalar_type() == student.scalar_type(), "kd_loss_fwd: grad_out must have the "
                        "student's dtype ", student.scalar_type(), ", got ", grad_out->scalar_type());
      grad = *grad_out;
    } else {
      grad = at::empty({N, C}, student.options());
    }
  }
  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor loss = reduction == kNone ? at::empty({N}, f32) : at::empty({}, f32);
  at::Tensor stats = return_stats ? at::empty({kNumStats, N}, f32) : at::Tensor();
  std::vector<float> row_buf(reduction == kNone ? 0 : N);

  FwdArgs a;
  int squarings = -1;
  for (int n = 0; n <= kMaxSquarings; ++n)
    if (temperature == double(1 << n)) squarings = n;
  a.k = RowConsts{C, static_cast<float>(alpha), static_cast<float>(temperature),
                  static_cast<float>(kLog2eD / temperature), squarings, return_stats};
  a.dc = DivConsts{static_cast<int>(divergence), beta,
                   topk_ids ? topk_ids->const_data_ptr<int64_t>() : nullptr,
                   topk_ids ? topk_logprobs->const_data_ptr<float>() : nullptr,
                   topk_ids ? topk_ids->stride(0) : 0, topk_ids ? topk_logprobs->stride(0) : 0, K, topk_ratio,
                   topk_tail};
  a.generic = divergence != 0 || topk_ids.has_value();
  a.target = y;
  a.target_stride = y_stride;
  a.ignore_index = ignore_index;
  a.s_stride = student.stride(0);
  a.t_stride = teacher ? teacher->stride(0) : 0;
  a.g_stride = need_grad ? grad.stride(0) : 0;
  a.N = N;
  a.weight = weight ? weight->const_data_ptr<float>() : nullptr;
  a.weight_stride = weight ? weight->stride(0) : 0;
  a.scale = reduction == kMean ? static_cast<float>(inv_n) : 1.0f;
  a.rows = reduction == kNone ? loss.data_ptr<float>() : row_buf.data();
  a.stats = return_stats ? stats.data_ptr<float>() : nullptr;

  if (N > 0) {
    dispatch_kernel_dtype(student.scalar_type(), [&](auto s_tag) {
      using S = decltype(s_tag);
      S* g = need_grad ? grad.data_ptr<S>() : nullptr;
      if (!teacher) {
        kd_loss_fwd_rows<S, float>(a, student.const_data_ptr<S>(), nullptr, g);
        return;
      }
      dispatch_kernel_dtype(teacher->scalar_type(), [&](auto t_tag) {
        using T = decltype(t_tag);
        kd_loss_fwd_rows<S, T>(a, student.const_data_ptr<S>(), teacher->const_data_ptr<T>(), g);
      });
    });
  }
  if (reduction != kNone) {  // in row order: deterministic whatever the threads did
    double total = 0;
    for (int64_t i = 0; i < N; ++i) total += row_buf[i];
    *loss.data_ptr<float>() = static_cast<float>(reduction == kMean ? total * inv_n : total);
  }
  return {loss, grad, stats};
}

void kd_loss_bwd(at::Tensor grad, const at::Tensor& grad_output) {
  if (grad.numel() == 0) return;
  if (grad_output.dim() == 0) {
    // the usual loss.backward() passes exactly 1: nothing to scale (read without a dispatched op)
    const double go = grad_output.is_cpu() && grad_output.scalar_type() == at::kFloat
                          ? double(*grad_output.const_data_ptr<float>()) : grad_output.item<double>();
    if (go == 1.0) return;
    grad.mul_(grad_output);
    return;
  }
  TORCH_CHECK_VALUE(grad_output.dim() == 1 && grad_output.size(0) == grad.size(0), "kd_loss_bwd: grad_output "
                    "must be 0-d or have one entry per row (", grad.size(0), ",), got ", grad_output.sizes());
  grad.mul_(grad_output.unsqueeze(1));
}

}  // namespace kdfast

// ------------------------------------------------------------------------------------ eager autograd
// The eager path of the C++ backend as one autograd node written in C++: its backward (scale the stored
// gradient in place, or nothing when the upstream gradient is exactly 1) runs without Python, which at small
// shapes costs more than the arithmetic.
namespace kdfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct KDLossNode : public torch::autograd::Function<KDLossNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& student,
                               const std::optional<at::Tensor>& teacher, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, double alpha, double temperature,
                               int64_t ignore_index, int64_t reduction, bool return_stats, bool inplace,
                               bool validate, bool need_grad) {
    auto [loss, grad, stats] = kd_loss_fwd(student, teacher, target, weight, alpha, temperature, ignore_index,
                                           reduction, need_grad, return_stats,
                                           inplace ? std::optional<at::Tensor>(student) : std::nullopt, validate);
    ctx->saved_data["grad"] = grad;
    ctx->saved_data["used"] = false;
    ctx->set_materialize_grads(false);
    if (!stats.defined()) return {loss};  // (an output must be a tensor: no placeholder for absent stats)
    ctx->mark_non_differentiable({stats});
    return {loss, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list out(12);
    TORCH_CHECK(!ctx->saved_data["used"].toBool(), "kd_loss: backward ran twice through the same graph; the fused "
                "loss keeps one gradient buffer and scales it in place (recompute the loss instead of "
                "retain_graph=True)");
    // handed over, not kept: the only reference lets the engine's accumulation into .grad take the buffer
    // instead of copying it
    at::Tensor grad = std::move(ctx->saved_data["grad"]).toTensor();
    ctx->saved_data["grad"] = at::Tensor();
    if (!grad.defined() || !grad_outputs[0].defined()) return out;
    ctx->saved_data["used"] = true;
    kd_loss_bwd(grad, grad_outputs[0]);
    out[0] = std::move(grad);
    return out;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> kd_loss_autograd(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, double alpha, double temperature, int64_t ignore_index,
    int64_t reduction, bool return_stats, bool inplace, bool validate) {
  // (needs_input_grad is unusable here: without an input that requires grad, apply builds no node)
  const bool need_grad = student.requires_grad() && at::GradMode::is_enabled();
  auto out = KDLossNode::apply(student, teacher, target, weight, alpha, temperature, ignore_index, reduction,
                               return_stats, inplace, validate, need_grad);
  return {out[0], out.size() > 1 ? out[1] : at::Tensor()};
}

}  // namespace kdfast
