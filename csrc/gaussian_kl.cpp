// Reparameterised sample and analytic KL of diagonal Gaussians, for any number of layers at once:
//   z  = mu_q + e^{lv_q / 2} eps
//   kl = sum over a row of 1/2 (lv_p - lv_q + (e^{lv_q} + (mu_q - mu_p)^2) e^{-lv_p} - 1)
// The work is cut into tasks of (layer, batch row, chunk of kChunk elements). Each task sums its
// chunk with kLanes independent accumulators (so the loop vectorises), and the chunk sums of a row
// are added in order afterwards: the result never depends on how tasks are spread over threads.
// eps comes from the caller (torch's generator), as float32.
#include "common.h"

#include <ATen/core/List.h>

namespace dvp {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kChunk = 4096;  // elements per task (a multiple of kLanes)
constexpr int64_t kMinElemsPerThread = 65536;  // less work per thread loses to the cost of waking it

struct Task {
  int64_t layer, row, begin, end;  // element range [begin, end) inside row `row` of `layer`
};

// One task per (layer, row, chunk), in that order.
std::vector<Task> make_tasks(at::TensorList mu_q) {
  std::vector<Task> tasks;
  for (int64_t l = 0; l < static_cast<int64_t>(mu_q.size()); ++l) {
    const int64_t B = mu_q[l].size(0), n = B ? mu_q[l].numel() / B : 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < std::max<int64_t>(n, 1); i += kChunk) tasks.push_back({l, b, i, std::min(i + kChunk, n)});
  }
  return tasks;
}

// Tasks per thread at least, so that each thread gets ~kMinElemsPerThread elements.
int64_t task_grain(const std::vector<Task>& tasks) {
  int64_t total = 0;
  for (const Task& t : tasks) total += t.end - t.begin;
  const int64_t per_task = std::max<int64_t>(1, total / std::max<int64_t>(1, static_cast<int64_t>(tasks.size())));
  return std::max<int64_t>(1, kMinElemsPerThread / per_task);
}

// Fixed-order sum of the lanes (pairwise, the same for every call).
inline float sum_lanes(const float* acc) {
  float s8[8];
  for (int j = 0; j < 8; ++j) s8[j] = acc[j] + acc[j + 8];
  for (int j = 0; j < 4; ++j) s8[j] += s8[j + 4];
  return (s8[0] + s8[2]) + (s8[1] + s8[3]);
}

template <typename T>
float kl_chunk(const typename IO<T>::raw* __restrict__ mq, const typename IO<T>::raw* __restrict__ lq,
               const typename IO<T>::raw* __restrict__ mp, const typename IO<T>::raw* __restrict__ lp,
               const float* __restrict__ eps, typename IO<T>::raw* __restrict__ z, int64_t n) {
  float acc[kLanes] = {};
  int64_t i0 = 0;
  for (; i0 + kLanes <= n; i0 += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const int64_t i = i0 + j;
      const float mu_q = IO<T>::ld(mq[i]), lv_q = IO<T>::ld(lq[i]);
      const float mu_p = IO<T>::ld(mp[i]), lv_p = IO<T>::ld(lp[i]);
      const float sd = fexp(0.5f * lv_q), inv_var_p = fexp(-lv_p), diff = mu_q - mu_p;
      z[i] = IO<T>::st(mu_q + sd * eps[i]);
      acc[j] += 0.5f * (lv_p - lv_q + (sd * sd + diff * diff) * inv_var_p - 1.0f);
    }
  }
  float tail = 0.0f;
  for (int64_t i = i0; i < n; ++i) {
    const float mu_q = IO<T>::ld(mq[i]), lv_q = IO<T>::ld(lq[i]);
    const float mu_p = IO<T>::ld(mp[i]), lv_p = IO<T>::ld(lp[i]);
    const float sd = fexp(0.5f * lv_q), inv_var_p = fexp(-lv_p), diff = mu_q - mu_p;
    z[i] = IO<T>::st(mu_q + sd * eps[i]);
    tail += 0.5f * (lv_p - lv_q + (sd * sd + diff * diff) * inv_var_p - 1.0f);
  }
  return sum_lanes(acc) + tail;
}

template <typename T>
DVP_INLINE void store(typename IO<T>::raw* __restrict__ out, const float* __restrict__ v, int64_t n) {
  if (out)
    for (int64_t i = 0; i < n; ++i) out[i] = IO<T>::st(v[i]);
}

// Gradients of one chunk, block by block: all five into local buffers (a branch-free loop that
// vectorises), then copied out where wanted. gz is null when z was unused; outputs are null when
// not needed.
template <typename T, bool kHasGz>
void kl_chunk_backward(const typename IO<T>::raw* __restrict__ mq, const typename IO<T>::raw* __restrict__ lq,
                       const typename IO<T>::raw* __restrict__ mp, const typename IO<T>::raw* __restrict__ lp,
                       const float* __restrict__ eps, const typename IO<T>::raw* __restrict__ gz, float gk,
                       typename IO<T>::raw* __restrict__ g_mq, typename IO<T>::raw* __restrict__ g_lq,
                       typename IO<T>::raw* __restrict__ g_mp, typename IO<T>::raw* __restrict__ g_lp,
                       float* __restrict__ g_eps, int64_t n) {
  constexpr int64_t kBlock = 256;
  float b_mq[kBlock], b_lq[kBlock], b_mp[kBlock], b_lp[kBlock], b_eps[kBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t len = std::min(kBlock, n - i0);
    for (int64_t j = 0; j < len; ++j) {
      const int64_t i = i0 + j;
      const float mu_q = IO<T>::ld(mq[i]), lv_q = IO<T>::ld(lq[i]);
      const float mu_p = IO<T>::ld(mp[i]), lv_p = IO<T>::ld(lp[i]);
      const float g = kHasGz ? IO<T>::ld(gz[i]) : 0.0f;
      const float sd = fexp(0.5f * lv_q), inv_var_p = fexp(-lv_p), diff = mu_q - mu_p;
      const float dk_dmu = gk * diff * inv_var_p;  // d kl / d mu_q = (mu_q - mu_p) / var_p
      b_mq[j] = g + dk_dmu;
      b_mp[j] = -dk_dmu;
      b_lq[j] = 0.5f * g * sd * eps[i] + 0.5f * gk * (sd * sd * inv_var_p - 1.0f);
      b_lp[j] = 0.5f * gk * (1.0f - (sd * sd + diff * diff) * inv_var_p);
      b_eps[j] = g * sd;
    }
    store<T>(g_mq ? g_mq + i0 : nullptr, b_mq, len);
    store<T>(g_lq ? g_lq + i0 : nullptr, b_lq, len);
    store<T>(g_mp ? g_mp + i0 : nullptr, b_mp, len);
    store<T>(g_lp ? g_lp + i0 : nullptr, b_lp, len);
    store<float>(g_eps ? g_eps + i0 : nullptr, b_eps, len);
  }
}

void check_layers(at::TensorList mu_q, at::TensorList lv_q, at::TensorList mu_p, at::TensorList lv_p,
                  at::TensorList noise) {
  const size_t L = mu_q.size();
  TORCH_CHECK(L > 0, "gaussian_kl: expected at least one layer");
  TORCH_CHECK(lv_q.size() == L && mu_p.size() == L && lv_p.size() == L && noise.size() == L,
              "gaussian_kl: every argument needs one tensor per layer");
  for (size_t l = 0; l < L; ++l) {
    for (const at::Tensor* t : {&mu_q[l], &lv_q[l], &mu_p[l], &lv_p[l]}) {
      TORCH_CHECK(t->is_contiguous() && t->scalar_type() == mu_q[l].scalar_type() && t->sizes() == mu_q[l].sizes(),
                  "gaussian_kl: layer ", l, " needs contiguous tensors of one shape and dtype");
    }
    TORCH_CHECK(noise[l].is_contiguous() && noise[l].scalar_type() == at::kFloat && noise[l].sizes() == mu_q[l].sizes(),
                "gaussian_kl: noise of layer ", l, " must be contiguous float32 of the layer's shape");
    TORCH_CHECK(mu_q[l].size(0) == mu_q[0].size(0), "gaussian_kl: all layers need the same batch size");
  }
}

}  // namespace

// Returns ([z_l] in each layer's dtype, kl (B, L) float32).
std::tuple<std::vector<at::Tensor>, at::Tensor> gaussian_kl(at::TensorList mu_q, at::TensorList lv_q,
                                                            at::TensorList mu_p, at::TensorList lv_p,
                                                            at::TensorList noise) {
  check_layers(mu_q, lv_q, mu_p, lv_p, noise);
  const int64_t L = static_cast<int64_t>(mu_q.size()), B = mu_q[0].size(0);
  std::vector<at::Tensor> z;
  for (int64_t l = 0; l < L; ++l) z.push_back(empty(mu_q[l], mu_q[l].sizes(), mu_q[l].scalar_type()));
  at::Tensor kl = empty(mu_q[0], {B, L}, at::kFloat);
  if (B == 0) return {z, kl};
  const std::vector<Task> tasks = make_tasks(mu_q);
  std::vector<float> partial(tasks.size());
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), task_grain(tasks), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Task& t = tasks[k];
      const int64_t n = mu_q[t.layer].numel() / B, off = t.row * n + t.begin, len = t.end - t.begin;
      DVP_DISPATCH(mu_q[t.layer].scalar_type(), "gaussian_kl", [&] {
        partial[k] = kl_chunk<scalar_t>(in_ptr<scalar_t>(mu_q[t.layer]) + off, in_ptr<scalar_t>(lv_q[t.layer]) + off,
                                        in_ptr<scalar_t>(mu_p[t.layer]) + off, in_ptr<scalar_t>(lv_p[t.layer]) + off,
                                        noise[t.layer].const_data_ptr<float>() + off,
                                        out_ptr<scalar_t>(z[t.layer]) + off, len);
      });
    }
  });
  float* klp = kl.mutable_data_ptr<float>();
  for (int64_t i = 0; i < B * L; ++i) klp[i] = 0.0f;
  for (size_t k = 0; k < tasks.size(); ++k) klp[tasks[k].row * L + tasks[k].layer] += partial[k];  // in task order
  return {z, kl};
}

// need: bit 0 mu_q, 1 logvar_q, 2 mu_p, 3 logvar_p, 4 noise. Returns the 5 L gradients in that
// order (empty where not needed); noise gradients are float32.
std::vector<at::Tensor> gaussian_kl_backward(const c10::List<std::optional<at::Tensor>>& grad_z_in,
                                             const at::Tensor& grad_kl_in, at::TensorList mu_q,
                                             at::TensorList lv_q, at::TensorList mu_p,
                                             at::TensorList lv_p, at::TensorList noise, int64_t need) {
  check_layers(mu_q, lv_q, mu_p, lv_p, noise);
  const int64_t L = static_cast<int64_t>(mu_q.size()), B = mu_q[0].size(0);
  TORCH_CHECK(static_cast<int64_t>(grad_z_in.size()) == L, "gaussian_kl_backward: one grad_z per layer");
  const at::Tensor grad_kl = grad_kl_in.to(at::kFloat).contiguous();
  TORCH_CHECK(grad_kl.numel() == B * L, "gaussian_kl_backward: grad_kl must be (B, L)");
  std::vector<at::Tensor> grad_z(L);
  for (int64_t l = 0; l < L; ++l) {
    const std::optional<at::Tensor> g = grad_z_in.get(l);
    if (g.has_value() && g->defined()) grad_z[l] = g->to(mu_q[l].scalar_type()).contiguous();
  }
  std::vector<at::Tensor> grads(5 * L);
  for (int64_t which = 0; which < 5; ++which)
    for (int64_t l = 0; l < L; ++l)
      grads[which * L + l] = !(need & (1 << which)) ? empty(noise[l], {0}, at::kFloat)
                             : which == 4           ? empty(noise[l], noise[l].sizes(), at::kFloat)
                                                    : empty(mu_q[l], mu_q[l].sizes(), mu_q[l].scalar_type());
  if (B == 0) return grads;
  const std::vector<Task> tasks = make_tasks(mu_q);
  const float* gk = grad_kl.const_data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), task_grain(tasks), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Task& t = tasks[k];
      const int64_t l = t.layer, n = mu_q[l].numel() / B, off = t.row * n + t.begin, len = t.end - t.begin;
      DVP_DISPATCH(mu_q[l].scalar_type(), "gaussian_kl_backward", [&] {
        auto out = [&](int64_t which) -> typename IO<scalar_t>::raw* {
          return (need & (1 << which)) ? out_ptr<scalar_t>(grads[which * L + l]) + off : nullptr;
        };
        auto run = grad_z[l].defined() ? kl_chunk_backward<scalar_t, true> : kl_chunk_backward<scalar_t, false>;
        run(in_ptr<scalar_t>(mu_q[l]) + off, in_ptr<scalar_t>(lv_q[l]) + off, in_ptr<scalar_t>(mu_p[l]) + off,
            in_ptr<scalar_t>(lv_p[l]) + off, noise[l].const_data_ptr<float>() + off,
            grad_z[l].defined() ? in_ptr<scalar_t>(grad_z[l]) + off : nullptr, gk[t.row * L + l], out(0), out(1),
            out(2), out(3), (need & 16) ? grads[4 * L + l].mutable_data_ptr<float>() + off : nullptr, len);
      });
    }
  });
  return grads;
}

}  // namespace dvp
