// The fused knowledge-distillation loss on CPU tensors: declarations shared with the Python bindings.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace kdfast {

// Per row i (student s, teacher t, label y, weight w, temperature T, distillation weight alpha, any finite value):
//   rows[i]  = w_i ((1 - alpha) ce_i + alpha T^2 kl_i)        0 for ignored rows, NaN for labels outside [0, C)
//   grad[i]  = scale * w_i ((1 - alpha)(softmax(s_i) - e_y) + alpha T (softmax(s_i/T) - softmax(t_i/T)))
//   stats[:, i] = ce, kl, el2n, grad_norm (without scale), correct, margin   (6, N)
// reduction 0 (none): loss = rows (N,), scale 1; 1 (sum): loss = sum rows (0-d), scale 1; 2 (mean): loss =
// sum rows / n and scale = 1 / n, n = max(1, rows not ignored). Sums run in row order (deterministic).
// Non-finite logits: a student row with NaN or +inf (or no finite logit) gets NaN loss, gradient and stats
// but correct = 0; a teacher row with NaN or +inf (or no finite logit) makes kl NaN, and the loss, gradient and
// grad_norm too unless alpha == 0. -inf is a legal logit (an impossible class).
// validate: raise a ValueError naming the first label outside [0, C) that is not ignore_index (checked before
// anything is written); without it such rows are NaN.
// student (N, C) fp32/fp16/bf16 with unit class stride and any row stride; teacher the same shape (any of
// those dtypes) or none; target (N,) int64; weight (N,) fp32 or none; grad_out an (N, C) buffer of the
// student's dtype that receives the gradient (it may be the student itself). grad and stats come back empty
// when need_grad / return_stats are false.
// divergence 0 (kl: the formulas above), 1 (reverse_kl), 2 (jsd with beta): kl_i and the teacher's gradient
// term become that divergence's (kdfast/reference/kd_loss.py). normalizer: the mean's n instead of the count.
// A sparse teacher instead of `teacher`: topk_ids (N, k) int64 and topk_logprobs (N, k) fp32, renormalised
// over the k at scale topk_ratio, or (topk_tail) with a tail bucket of the missing mass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, double alpha, double temperature, int64_t ignore_index,
    int64_t reduction, bool need_grad, bool return_stats, const std::optional<at::Tensor>& grad_out,
    bool validate, int64_t divergence = 0, double beta = 0.5, std::optional<double> normalizer = std::nullopt,
    const std::optional<at::Tensor>& topk_ids = std::nullopt,
    const std::optional<at::Tensor>& topk_logprobs = std::nullopt, double topk_ratio = 1.0, bool topk_tail = false);

// The eager forward of kd_loss as one autograd node (kd_loss_fwd, then the stored gradient scaled by the
// backward in C++): (loss, stats); student's gradient flows through loss. inplace: the gradient is written into
// student's memory. A second backward through the same node raises.
std::tuple<at::Tensor, at::Tensor> kd_loss_autograd(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, double alpha, double temperature, int64_t ignore_index,
    int64_t reduction, bool return_stats, bool inplace, bool validate);

// In place grad *= grad_output: a 0-d scalar (nothing to do when it is exactly 1) or one factor per row (N,).
void kd_loss_bwd(at::Tensor grad, const at::Tensor& grad_output);

}  // namespace kdfast
