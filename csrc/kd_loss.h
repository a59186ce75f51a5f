// The fused knowledge-distillation loss on CPU tensors: declarations shared with the Python bindings.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace kdfast {

// Per row i (student s, teacher t, label y, weight w, temperature T, distillation weight alpha):
//   rows[i]  = w_i ((1 - alpha) ce_i + alpha T^2 kl_i)        0 for ignored rows, NaN for labels outside [0, C)
//   grad[i]  = grad_scale * w_i ((1 - alpha)(softmax(s_i) - e_y) + alpha T (softmax(s_i/T) - softmax(t_i/T)))
//   stats[:, i] = ce, kl, el2n, grad_norm (without grad_scale), correct, margin   (6, N)
// student (N, C) fp32/fp16/bf16 with unit class stride and any row stride; teacher the same shape (any of
// those dtypes) or none; target (N,) int64; weight (N,) fp32 or none; grad_scale a one-element fp32 tensor
// or none (= 1); grad_out an (N, C) buffer of the student's dtype that receives the gradient (it may be the
// student itself). grad and stats come back empty when need_grad / return_stats are false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_fwd(
    const at::Tensor& student, const std::optional<at::Tensor>& teacher, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& grad_scale, double alpha,
    double temperature, int64_t ignore_index, bool need_grad, bool return_stats,
    const std::optional<at::Tensor>& grad_out);

// In place grad *= grad_output: a 0-d scalar (nothing to do when it is exactly 1) or one factor per row (N,).
void kd_loss_bwd(at::Tensor grad, const at::Tensor& grad_output);

}  // namespace kdfast
