// Fused knowledge-distillation loss on CPU tensors: rows in parallel, three vectorised passes per row.
//
// Per row (student s, teacher t, label y, weight w, temperature T, distillation weight a), with
//   m = max s, mt = max t, e1_c = exp(s_c - m), eT_c = exp(v_c), eu_c = exp(u_c), v = (s - m)/T, u = (t - mt)/T,
//   Z1 = sum e1, ZT = sum eT, Zt = sum eu   (softmax(s) = e1/Z1, p = softmax(s/T) = eT/ZT, q = eu/Zt):
//   ce  = -log softmax(s)_y = log Z1 - (s_y - m)
//   kl  = sum_c q_c (log q_c - log p_c) = (sum_c eu_c (u_c - v_c)) / Zt - log Zt + log ZT
//         (a class with eu_c = 0, i.e. a teacher logit of -inf, adds exactly 0)
//   h_c = d l / d s_c = w ((1 - a)(e1_c/Z1 - [c = y]) + a T (eT_c/ZT - eu_c/Zt)),  gradient = grad_scale * h
//   loss = w ((1 - a) ce + a T^2 kl)  (Hinton et al. 2015, "Distilling the knowledge in a neural network")
// Pass 1 finds the maxima; pass 2 computes the exponentials into a row-sized fp32 scratch and sums them;
// pass 3 writes the gradient and sums its squares. Each pass runs over [0, y) and (y, C) and treats the label's
// class apart: 1 - softmax(s)_y = (sum of the other classes' e1) / Z1 then keeps its relative precision on
// confidently right rows, and so do ce, el2n, grad_norm and the gradient's y entry. Sums run in fp32 vector
// lanes within blocks of kSumBlock elements and in double across blocks (C up to 262144 and beyond).
#include "kd_loss.h"

#include <ATen/Parallel.h>
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
#else
#define KD_INLINE inline
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

// exp(x) for x <= 0 (logit minus its row maximum), branch-free so loops vectorise: Cody-Waite reduction
// x = n ln2 + r, a degree-6 polynomial for exp(r) on [-ln2/2, ln2/2] (Cephes expf, < 2 ulp), times 2^n.
// Below the normal fp32 range it returns exactly 0, so a teacher logit of -inf gives q = 0; NaN stays NaN.
KD_INLINE float exp_nonpos(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  constexpr float kLowest = -87.0f;      // exp(-87) ~ 1.6e-38: 2^n stays a normal number
  const float xc = x < kLowest ? kLowest : x;
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < kLowest ? 0.0f : p * two_n;
}

KD_INLINE float range_max(const float* x, int64_t lo, int64_t hi) {
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int64_t c = lo; c < hi; ++c) m = x[c] > m ? x[c] : m;
  return m;
}

struct ExpSums {
  double z1 = 0, zT = 0, zt = 0, kl = 0, sq1 = 0;  // sum e1, eT, eu, eu (u - v), e1^2
};

// Pass 2 over [lo, hi): the exponentials into e1/eT/eu and their sums into acc.
template <bool HAS_TEACHER>
KD_INLINE void exp_pass(const float* s, const float* t, float m, float mt, float inv_T, int64_t lo, int64_t hi,
                        float* e1, float* eT, float* eu, ExpSums& acc) {
  for (int64_t b = lo; b < hi; b += kSumBlock) {
    const int64_t end = std::min(hi, b + kSumBlock);
    float z1 = 0, zT = 0, zt = 0, kl = 0, sq1 = 0;
#pragma omp simd reduction(+ : z1, zT, zt, kl, sq1)
    for (int64_t c = b; c < end; ++c) {
      const float d = s[c] - m;
      const float x1 = exp_nonpos(d);
      e1[c] = x1;
      z1 += x1;
      sq1 += x1 * x1;
      if constexpr (HAS_TEACHER) {
        const float v = d * inv_T, u = (t[c] - mt) * inv_T;
        const float xT = exp_nonpos(v), xu = exp_nonpos(u);
        eT[c] = xT;
        eu[c] = xu;
        zT += xT;
        zt += xu;
        kl += xu > 0.0f ? xu * (u - v) : 0.0f;  // q = 0 adds 0, never 0 * inf
      }
    }
    acc.z1 += z1, acc.zT += zT, acc.zt += zt, acc.kl += kl, acc.sq1 += sq1;
  }
}

// Pass 3 over [lo, hi) (classes other than the label): h = c1 e1 + c2 eT - c3 eu; writes scale * h when
// WRITE_GRAD; returns sum h^2.
template <bool HAS_TEACHER, bool WRITE_GRAD>
KD_INLINE double grad_pass(const float* e1, const float* eT, const float* eu, float c1, float c2, float c3,
                           float scale, int64_t lo, int64_t hi, float* g) {
  double sq = 0;
  for (int64_t b = lo; b < hi; b += kSumBlock) {
    const int64_t end = std::min(hi, b + kSumBlock);
    float part = 0;
#pragma omp simd reduction(+ : part)
    for (int64_t c = b; c < end; ++c) {
      float h = c1 * e1[c];
      if constexpr (HAS_TEACHER) h += c2 * eT[c] - c3 * eu[c];
      part += h * h;
      if constexpr (WRITE_GRAD) g[c] = scale * h;
    }
    sq += part;
  }
  return sq;
}

struct RowConsts {
  int64_t C;
  float alpha, temperature, inv_T;
};

// One valid row (0 <= y < C). s, t: fp32 rows; scratch: 3 C floats; g: fp32 gradient row or nullptr. g may be
// s itself (in place) or e1, scratch's first C floats: pass 3 never reads s, and reads e1[c] before writing g[c].
// out: loss, then the kNumStats statistics.
template <bool HAS_TEACHER, bool WRITE_GRAD>
KD_INLINE void kd_row_impl(const RowConsts& k, const float* s, const float* t, int64_t y, float w, float scale,
                           float* scratch, float* g, float* out) {
  const int64_t C = k.C;
  float* e1 = scratch;
  float* eT = scratch + C;
  float* eu = scratch + 2 * C;
  // Pass 1: maxima (the student's excluding the label, for the margin).
  const float s_y = s[y];
  const float max_other = std::max(range_max(s, 0, y), range_max(s, y + 1, C));
  const float m = std::max(max_other, s_y);
  const float mt = HAS_TEACHER ? range_max(t, 0, C) : 0.0f;
  // Pass 2: exponentials; `others` holds every class but the label, `label` the label's own.
  ExpSums others, label;
  exp_pass<HAS_TEACHER>(s, t, m, mt, k.inv_T, 0, y, e1, eT, eu, others);
  exp_pass<HAS_TEACHER>(s, t, m, mt, k.inv_T, y + 1, C, e1, eT, eu, others);
  exp_pass<HAS_TEACHER>(s, t, m, mt, k.inv_T, y, y + 1, e1, eT, eu, label);
  const double z1 = others.z1 + label.z1;
  const double one_minus_sm_y = others.z1 / z1;
  const double ce = s_y == m ? std::log1p(others.z1) : std::log(z1) + (double(m) - double(s_y));
  double kl = kNaN;
  if (HAS_TEACHER) {
    const double zT = others.zT + label.zT, zt = others.zt + label.zt;
    kl = (others.kl + label.kl) / zt - std::log(zt) + std::log(zT);
  }
  const double kd_term = k.alpha == 0.0f ? 0.0 : double(k.alpha) * k.temperature * k.temperature * kl;
  out[0] = static_cast<float>(w * ((1.0 - k.alpha) * ce + kd_term));
  // Pass 3: gradient (h_y from the exact 1 - softmax(s)_y) and its norm.
  const float c1 = static_cast<float>(w * (1.0 - k.alpha) / z1);
  float c2 = 0.0f, c3 = 0.0f, h_y = static_cast<float>(-w * (1.0 - k.alpha) * one_minus_sm_y);
  if (HAS_TEACHER) {
    const double kd = double(w) * k.alpha * k.temperature;
    c2 = static_cast<float>(kd / (others.zT + label.zT));
    c3 = static_cast<float>(kd / (others.zt + label.zt));
    h_y += c2 * eT[y] - c3 * eu[y];
  }
  double sq = grad_pass<HAS_TEACHER, WRITE_GRAD>(e1, eT, eu, c1, c2, c3, scale, 0, y, g) +
              grad_pass<HAS_TEACHER, WRITE_GRAD>(e1, eT, eu, c1, c2, c3, scale, y + 1, C, g);
  sq += double(h_y) * h_y;
  if (WRITE_GRAD) g[y] = scale * h_y;
  const float margin = s_y - max_other;  // +inf when C == 1
  out[1] = static_cast<float>(ce);
  out[2] = static_cast<float>(kl);
  out[3] = static_cast<float>(std::sqrt(others.sq1 / (z1 * z1) + one_minus_sm_y * one_minus_sm_y));
  out[4] = static_cast<float>(std::sqrt(sq));
  out[5] = margin > 0.0f ? 1.0f : 0.0f;
  out[6] = margin;
}

KD_TARGET_CLONES void kd_row(const RowConsts& k, const float* s, const float* t, int64_t y, float w, float scale,
                             float* scratch, float* g, float* out) {
  if (t != nullptr) {
    g ? kd_row_impl<true, true>(k, s, t, y, w, scale, scratch, g, out)
      : kd_row_impl<true, false>(k, s, t, y, w, scale, scratch, g, out);
  } else {
    g ? kd_row_impl<false, true>(k, s, t, y, w, scale, scratch, g, out)
      : kd_row_impl<false, false>(k, s, t, y, w, scale, scratch, g, out);
  }
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
    // scratch: e1 | eT | eu, then fp32 copies of the student and teacher rows where their dtype is narrower
    const int64_t extra = (std::is_same_v<S, float> ? 0 : C) + (std::is_same_v<T, float> ? 0 : C);
    std::vector<float> scratch(3 * C + extra);
    float* s_buf = scratch.data() + 3 * C;
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
        // fp32 writes straight into the output row; narrower dtypes go through scratch (e1 is free by then)
        float* g = nullptr;
        if (g_row) g = std::is_same_v<S, float> ? reinterpret_cast<float*>(g_row) : scratch.data();
        kd_row(a.k, s, t, y, w, a.scale, scratch.data(), g, out);
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
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& grad_scale, double alpha,
    double temperature, int64_t ignore_index, bool need_grad, bool return_stats,
    const std::optional<at::Tensor>& grad_out) {
  TORCH_CHECK_VALUE(student.dim() == 2, "kd_loss_fwd: student must have shape (N, C), got ", student.sizes());
  const int64_t N = student.size(0), C = student.size(1);
  TORCH_CHECK_VALUE(C >= 1, "kd_loss_fwd: student must have at least one class, got shape ", student.sizes());
  check_rows_arg("student", student, N, C);
  if (teacher) check_rows_arg("teacher", *teacher, N, C);
  check_per_row_arg("target", target, N, at::kLong);
  if (weight) check_per_row_arg("weight", *weight, N, at::kFloat);
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "kd_loss_fwd: alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(temperature > 0.0 && std::isfinite(temperature),
                    "kd_loss_fwd: temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK_VALUE(teacher || alpha == 0.0, "kd_loss_fwd: teacher is None, which needs alpha == 0, got ", alpha);
  float scale = 1.0f;
  if (grad_scale) {
    TORCH_CHECK_VALUE(grad_scale->numel() == 1 && grad_scale->scalar_type() == at::kFloat,
                      "kd_loss_fwd: grad_scale must be a one-element float32 tensor, got ", grad_scale->sizes(),
                      " ", grad_scale->scalar_type());
    scale = grad_scale->item<float>();
  }
  at::Tensor grad = student.new_empty({0});
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
  at::Tensor rows = at::empty({N}, student.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({return_stats ? kNumStats : 0, N}, rows.options());

  FwdArgs a;
  a.k = RowConsts{C, static_cast<float>(alpha), static_cast<float>(temperature),
                  static_cast<float>(1.0 / temperature)};
  a.target = target.data_ptr<int64_t>();
  a.target_stride = target.stride(0);
  a.ignore_index = ignore_index;
  a.s_stride = student.stride(0);
  a.t_stride = teacher ? teacher->stride(0) : 0;
  a.g_stride = need_grad ? grad.stride(0) : 0;
  a.N = N;
  a.weight = weight ? weight->data_ptr<float>() : nullptr;
  a.weight_stride = weight ? weight->stride(0) : 0;
  a.scale = scale;
  a.rows = rows.data_ptr<float>();
  a.stats = return_stats ? stats.data_ptr<float>() : nullptr;
  if (N == 0) return {rows, grad, stats};

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
  return {rows, grad, stats};
}

void kd_loss_bwd(at::Tensor grad, const at::Tensor& grad_output) {
  if (grad.numel() == 0) return;
  if (grad_output.dim() == 0) {
    if (grad_output.item<double>() == 1.0) return;  // the usual loss.backward(): nothing to scale
    grad.mul_(grad_output);
    return;
  }
  TORCH_CHECK_VALUE(grad_output.dim() == 1 && grad_output.size(0) == grad.size(0), "kd_loss_bwd: grad_output "
                    "must be 0-d or have one entry per row (", grad.size(0), ",), got ", grad_output.sizes());
  grad.mul_(grad_output.unsqueeze(1));
}

}  // namespace kdfast
