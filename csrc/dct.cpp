// dct_crop (Algorithm 1) and idct_pad (Algorithm 2) with the cropped DCT basis A_d (d x D):
//   dct_crop: y = clamp(A_d ((x + 1) / 2) A_d^T / S, -1, 1)       (B, C, D, D) -> (B, C, d, d)
//   idct_pad: x = 2 clamp(A_d^T (u * S) A_d, 0, 1) - 1             (B, C, d, d) -> (B, C, D, D)
// One task per (b, c) plane; all inner loops run along a contiguous row of length D.
// Clamp gradients follow torch: zero where the input sits on or beyond a bound.
#include "common.h"

namespace dvp {
namespace {

// Y (d x d) = A M A^T for M (D x D), via T = A M (d x D). `t` is scratch of d * D floats.
inline void project(const float* __restrict__ a, const float* __restrict__ m, float* __restrict__ t,
                    float* __restrict__ y, int64_t d, int64_t D) {
  for (int64_t k = 0; k < d; ++k) {
    float* __restrict__ tk = t + k * D;
    for (int64_t n = 0; n < D; ++n) tk[n] = 0.0f;
    for (int64_t r = 0; r < D; ++r) {
      const float akr = a[k * D + r];
      const float* __restrict__ mr = m + r * D;
      for (int64_t n = 0; n < D; ++n) tk[n] += akr * mr[n];
    }
  }
  for (int64_t k = 0; k < d; ++k) {
    for (int64_t l = 0; l < d; ++l) {
      const float* __restrict__ tk = t + k * D;
      const float* __restrict__ al = a + l * D;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t n = 0; n < D; ++n) s += tk[n] * al[n];
      y[k * d + l] = s;
    }
  }
}

// M (D x D) = A^T V A for V (d x d), via W = V A (d x D). `w` is scratch of d * D floats.
inline void expand(const float* __restrict__ a, const float* __restrict__ v, float* __restrict__ w,
                   float* __restrict__ m, int64_t d, int64_t D) {
  for (int64_t k = 0; k < d; ++k) {
    float* __restrict__ wk = w + k * D;
    for (int64_t j = 0; j < D; ++j) wk[j] = 0.0f;
    for (int64_t l = 0; l < d; ++l) {
      const float vkl = v[k * d + l];
      const float* __restrict__ al = a + l * D;
      for (int64_t j = 0; j < D; ++j) wk[j] += vkl * al[j];
    }
  }
  for (int64_t i = 0; i < D; ++i) {
    float* __restrict__ mi = m + i * D;
    for (int64_t j = 0; j < D; ++j) mi[j] = 0.0f;
    for (int64_t k = 0; k < d; ++k) {
      const float aki = a[k * D + i];
      const float* __restrict__ wk = w + k * D;
      for (int64_t j = 0; j < D; ++j) mi[j] += aki * wk[j];
    }
  }
}

// Planes per parallel task chunk: enough work (~10k flops a plane) to amortise a thread wake-up.
constexpr int64_t kPlaneGrain = 32;

// grad_scale[c] = sum over b of per_plane[b, c], in batch order (independent of the thread count).
at::Tensor reduce_over_batch(const at::Tensor& per_plane) {
  const int64_t B = per_plane.size(0), n = per_plane[0].numel();
  at::Tensor out = empty(per_plane, per_plane.sizes().slice(1), at::kFloat);
  const float* src = per_plane.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) dst[i] = 0.0f;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i) dst[i] += src[b * n + i];
  return out;
}

}  // namespace

// x (B, C, D, D) any float dtype; scale (C, d, d) and basis (d, D) contiguous float32.
// Returns y (B, C, d, d) in x's dtype and ratio = A x' A^T / S (float32, before the clamp).
std::tuple<at::Tensor, at::Tensor> dct_crop(const at::Tensor& x_in, const at::Tensor& scale,
                                            const at::Tensor& basis) {
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), D = x.size(3), d = basis.size(0);
  at::Tensor y = empty(x, {B, C, d, d}, x.scalar_type());
  at::Tensor ratio = empty(x, {B, C, d, d}, at::kFloat);
  const float* a = basis.const_data_ptr<float>();
  const float* s = scale.const_data_ptr<float>();
  float* rt = ratio.mutable_data_ptr<float>();
  DVP_DISPATCH(x.scalar_type(), "dct_crop", [&] {
    const auto* xp = in_ptr<scalar_t>(x);
    auto* yp = out_ptr<scalar_t>(y);
    at::parallel_for(0, B * C, kPlaneGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> m(D * D), t(d * D), c(d * d);
      for (int64_t p = begin; p < end; ++p) {
        const auto* xs = xp + p * D * D;
        for (int64_t i = 0; i < D * D; ++i) m[i] = (IO<scalar_t>::ld(xs[i]) + 1.0f) * 0.5f;
        project(a, m.data(), t.data(), c.data(), d, D);
        const float* sc = s + (p % C) * d * d;
        for (int64_t i = 0; i < d * d; ++i) {
          const float r = c[i] / sc[i];
          rt[p * d * d + i] = r;
          yp[p * d * d + i] = IO<scalar_t>::st(vmin(vmax(r, -1.0f), 1.0f));
        }
      }
    });
  });
  return {y, ratio};
}

// Gradients of dct_crop from the saved ratio: with G = grad_y where -1 < ratio < 1,
// grad_x = A^T (G / S) A / 2 and grad_scale = -sum_b G ratio / S.
std::tuple<at::Tensor, at::Tensor> dct_crop_backward(const at::Tensor& grad_y_in, const at::Tensor& ratio,
                                                     const at::Tensor& scale, const at::Tensor& basis,
                                                     bool need_x, bool need_scale, at::ScalarType x_dtype) {
  const at::Tensor grad_y = grad_y_in.contiguous();
  const int64_t B = ratio.size(0), C = ratio.size(1), d = ratio.size(2), D = basis.size(1);
  at::Tensor grad_x = empty(ratio, {need_x ? B : 0, C, D, D}, x_dtype);
  at::Tensor per_plane = empty(ratio, {need_scale ? B : 0, C, d, d}, at::kFloat);
  const float* a = basis.const_data_ptr<float>();
  const float* s = scale.const_data_ptr<float>();
  const float* rt = ratio.const_data_ptr<float>();
  float* gs = need_scale ? per_plane.mutable_data_ptr<float>() : nullptr;
  TORCH_CHECK(grad_y.scalar_type() == x_dtype, "dct_crop_backward: grad_y must have x's dtype");
  DVP_DISPATCH(x_dtype, "dct_crop_backward", [&] {
    using gy_t = scalar_t;
    const auto* gyp = in_ptr<gy_t>(grad_y);
    {
      auto* gxp = need_x ? out_ptr<scalar_t>(grad_x) : nullptr;
      at::parallel_for(0, B * C, kPlaneGrain, [&](int64_t begin, int64_t end) {
        std::vector<float> gc(d * d), w(d * D), m(D * D);
        for (int64_t p = begin; p < end; ++p) {
          const float* sc = s + (p % C) * d * d;
          for (int64_t i = 0; i < d * d; ++i) {
            const float r = rt[p * d * d + i];
            const float g = (r > -1.0f && r < 1.0f) ? IO<gy_t>::ld(gyp[p * d * d + i]) : 0.0f;
            gc[i] = 0.5f * g / sc[i];  // the 1/2 of (x + 1) / 2, folded in here
            if (gs) gs[p * d * d + i] = -g * r / sc[i];
          }
          if (gxp) {
            expand(a, gc.data(), w.data(), m.data(), d, D);
            auto* gx = gxp + p * D * D;
            for (int64_t i = 0; i < D * D; ++i) gx[i] = IO<scalar_t>::st(m[i]);
          }
        }
      });
    }
  });
  return {grad_x, need_scale ? reduce_over_batch(per_plane) : empty(per_plane, {0}, at::kFloat)};
}

// u (B, C, d, d) any float dtype; scale (C, d, d), basis (d, D) float32. Returns the image
// (B, C, D, D) in u's dtype and, when need_mask, where 0 < A^T (u S) A < 1 (for backward; else empty).
std::tuple<at::Tensor, at::Tensor> idct_pad(const at::Tensor& u_in, const at::Tensor& scale,
                                            const at::Tensor& basis, int64_t size, bool need_mask) {
  const at::Tensor u = u_in.contiguous();
  const int64_t B = u.size(0), C = u.size(1), d = u.size(2), D = size;
  TORCH_CHECK(basis.size(1) == D, "idct_pad: basis must be (d, size)");
  at::Tensor out = empty(u, {B, C, D, D}, u.scalar_type());
  at::Tensor mask = empty(u, {need_mask ? B : 0, C, D, D}, at::kBool);
  const float* a = basis.const_data_ptr<float>();
  const float* s = scale.const_data_ptr<float>();
  bool* mk = need_mask ? mask.mutable_data_ptr<bool>() : nullptr;
  DVP_DISPATCH(u.scalar_type(), "idct_pad", [&] {
    const auto* up = in_ptr<scalar_t>(u);
    auto* op = out_ptr<scalar_t>(out);
    at::parallel_for(0, B * C, kPlaneGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> v(d * d), w(d * D), m(D * D);
      for (int64_t p = begin; p < end; ++p) {
        const float* sc = s + (p % C) * d * d;
        for (int64_t i = 0; i < d * d; ++i) v[i] = IO<scalar_t>::ld(up[p * d * d + i]) * sc[i];
        expand(a, v.data(), w.data(), m.data(), d, D);
        auto* o = op + p * D * D;
        for (int64_t i = 0; i < D * D; ++i) o[i] = IO<scalar_t>::st(2.0f * vmin(vmax(m[i], 0.0f), 1.0f) - 1.0f);
        if (mk) {
          bool* mp = mk + p * D * D;
          for (int64_t i = 0; i < D * D; ++i) mp[i] = m[i] > 0.0f && m[i] < 1.0f;
        }
      }
    });
  });
  return {out, mask};
}

// With G = 2 grad_out where the clamp was inactive and V = A G A^T:
// grad_u = V S (u's dtype) and grad_scale = sum_b V u (float32).
std::tuple<at::Tensor, at::Tensor> idct_pad_backward(const at::Tensor& grad_out_in, const at::Tensor& mask,
                                                     const at::Tensor& u_in, const at::Tensor& scale,
                                                     const at::Tensor& basis, bool need_u, bool need_scale) {
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor u = u_in.contiguous();
  const int64_t B = u.size(0), C = u.size(1), d = u.size(2), D = basis.size(1);
  at::Tensor grad_u = empty(u, {need_u ? B : 0, C, d, d}, u.scalar_type());
  at::Tensor per_plane = empty(u, {need_scale ? B : 0, C, d, d}, at::kFloat);
  const float* a = basis.const_data_ptr<float>();
  const float* s = scale.const_data_ptr<float>();
  const bool* mk = mask.const_data_ptr<bool>();
  float* gs = need_scale ? per_plane.mutable_data_ptr<float>() : nullptr;
  TORCH_CHECK(grad_out.scalar_type() == u.scalar_type(), "idct_pad_backward: grad_out must have u's dtype");
  DVP_DISPATCH(u.scalar_type(), "idct_pad_backward", [&] {
    using go_t = scalar_t;
    const auto* gop = in_ptr<go_t>(grad_out);
    {
      const auto* up = in_ptr<scalar_t>(u);
      auto* gup = need_u ? out_ptr<scalar_t>(grad_u) : nullptr;
      at::parallel_for(0, B * C, kPlaneGrain, [&](int64_t begin, int64_t end) {
        std::vector<float> g(D * D), t(d * D), v(d * d);
        for (int64_t p = begin; p < end; ++p) {
          const auto* go = gop + p * D * D;
          const bool* mp = mk + p * D * D;
          for (int64_t i = 0; i < D * D; ++i) g[i] = mp[i] ? 2.0f * IO<go_t>::ld(go[i]) : 0.0f;
          project(a, g.data(), t.data(), v.data(), d, D);
          const float* sc = s + (p % C) * d * d;
          for (int64_t i = 0; i < d * d; ++i) {
            if (gup) gup[p * d * d + i] = IO<scalar_t>::st(v[i] * sc[i]);
            if (gs) gs[p * d * d + i] = v[i] * IO<scalar_t>::ld(up[p * d * d + i]);
          }
        }
      });
    }
  });
  return {grad_u, need_scale ? reduce_over_batch(per_plane) : empty(per_plane, {0}, at::kFloat)};
}

}  // namespace dvp
