// Discretized mixture of logistics log-likelihood of 8-bit RGB images in the reference form of
// dvp_fast/ops/dml.py (log-scales hard-clamped to [-8, 1], interior bins log(max(mass, 1e-10)), the
// first and last level the whole tail), forward and gradient in one pass over `params`, and
// sampling. Layout and semantics as dvp_fast/ops/dml.py:
//   params (B, M (3C + 1), H, W): M logits, then for each colour c a block of 3M channels holding
//   means [0, M), raw log-scales [M, 2M) and raw coupling coefficients [2M, 3M).
// One task is (image b, chunk of kPix pixels). Inside a task the loops run along the pixels,
// which are contiguous in every channel, so they vectorise; per-component intermediates stay in
// a small per-thread buffer and the gradient is written from it once the mixture weights are known.
#include "common.h"

namespace dvp {
namespace {

constexpr int64_t kPix = 64;             // pixels per task (32 and 128 measured slower)
constexpr float kHalfBin = 1.0f / 255.0f;
constexpr float kEdge = 0.999f;          // |x| above this is the first or last level
constexpr float kMassFloor = 1e-10f;     // interior bins: log(max(mass, floor)), no gradient below it
constexpr float kLogScaleMin = -8.0f;    // log-scales are hard-clamped to [min, max]
constexpr float kLogScaleMax = 1.0f;

// log P(bin of x) for one logistic (mean mu, raw log-scale lsr) and, when kGrad, its derivatives
// with respect to the centred value v = x - mu and to lsr. All three cases (left edge, right edge,
// interior with the mass floor) are computed and selected without branches, so calling loops
// vectorise; the cases share one logarithm.
template <bool kGrad>
DVP_INLINE void bin_logprob(float x, float mu, float lsr, float& lp, float& dv, float& dls) {
  const float ls = vmin(vmax(lsr, kLogScaleMin), kLogScaleMax);
  const float inv = fexp(-ls), v = x - mu;
  const float plus = inv * (v + kHalfBin), minus = inv * (v - kHalfBin);
  const float ep = fexp(-std::fabs(plus)), em = fexp(-std::fabs(minus));
  const float sp = ep / (1.0f + ep), sm = em / (1.0f + em);  // sigmoid(-|plus|), sigmoid(-|minus|)
  // sigmoid(plus) - sigmoid(minus) from the small tail sides: no cancellation when the bin lies
  // far in one tail.
  const float mass = minus >= 0.0f ? sm - sp : (plus <= 0.0f ? sp - sm : (1.0f - sp) - sm);
  const bool left = x < -kEdge, right = x > kEdge, edge = left || right;
  const bool interior = !edge && mass > kMassFloor;  // at or below the floor: log(1e-10), no gradient
  // Edges: log sigmoid(plus) = min(plus, 0) - log(1 + e^-|plus|), and the mirror for minus.
  const float l = flog(left ? 1.0f + ep : right ? 1.0f + em : vmax(mass, kMassFloor));
  lp = left ? vmin(plus, 0.0f) - l : right ? -vmax(minus, 0.0f) - l : l;
  if constexpr (kGrad) {
    // (Each select on its own line: GCC does not vectorise selects nested on other predicates.)
    const float inv_mass = 1.0f / vmax(mass, kMassFloor);
    const float sig_neg_plus = plus >= 0.0f ? sp : 1.0f - sp;  // d log sigmoid(plus) / d plus
    const float sig_minus = minus >= 0.0f ? 1.0f - sm : sm;    // -d log(1 - sigmoid(minus)) / d minus
    const float g_plus_in = interior ? sp * (1.0f - sp) * inv_mass : 0.0f;
    const float g_minus_in = interior ? -sm * (1.0f - sm) * inv_mass : 0.0f;
    const float g_plus = left ? sig_neg_plus : g_plus_in;
    const float g_minus = right ? -sig_minus : g_minus_in;
    dv = inv * (g_plus + g_minus);
    const float d_ls = -(plus * g_plus + minus * g_minus);
    // A hard clamp: no gradient outside [min, max], nor on the bounds themselves (as torch.clamp).
    const bool inside = lsr > kLogScaleMin && lsr < kLogScaleMax;
    dls = inside ? d_ls : 0.0f;
  }
}

// Per-thread scratch for one task: [M][kPix] arrays (dv, dls, coef: [3][M][kPix]).
struct Scratch {
  explicit Scratch(int64_t M)
      : lp(M * kPix), logit(M * kPix), e_mix(M * kPix), e_comp(M * kPix), dv(3 * M * kPix),
        dls(3 * M * kPix), coef(3 * M * kPix) {}
  std::vector<float> lp, logit, e_mix, e_comp, dv, dls, coef;
};

// One task: pixels [p0, p0 + n) of image b. Returns the sum of their log-likelihoods and, when
// kGrad, writes the (unscaled, float32) gradients to gpb (10M, P) and/or gxb (3, P) if not null.
template <typename T, bool kGrad>
float dml_task(const float* __restrict__ xb, const typename IO<T>::raw* __restrict__ pb, int64_t P, int64_t p0,
               int64_t n, int64_t M, float* __restrict__ gpb, float* __restrict__ gxb, Scratch& s) {
  using raw = typename IO<T>::raw;
  const float* __restrict__ xr = xb + p0;
  const float* __restrict__ xg = xb + P + p0;
  const float* __restrict__ xbl = xb + 2 * P + p0;
  // Channel rows: logits m; colour c's means, raw log-scales and raw coefficients of component m.
  auto logit_ch = [&](int64_t m) { return m; };
  auto mean_ch = [&](int64_t c, int64_t m) { return M + c * 3 * M + m; };
  auto scale_ch = [&](int64_t c, int64_t m) { return M + c * 3 * M + M + m; };
  auto coef_ch = [&](int64_t c, int64_t m) { return M + c * 3 * M + 2 * M + m; };
  auto row = [&](int64_t ch) { return pb + ch * P + p0; };
  float* __restrict__ lps = s.lp.data();
  float* __restrict__ lgs = s.logit.data();
  float* __restrict__ dvs = s.dv.data();
  float* __restrict__ dlss = s.dls.data();
  float* __restrict__ coefs = s.coef.data();
  auto at = [&](int64_t c, int64_t m) { return (c * M + m) * kPix; };  // offset into dv/dls/coef
  float dummy;

  // Pass 1, per component and colour: log P(bin) summed over colours, and its derivatives.
  // One loop per colour keeps the loop bodies small enough to stay in registers.
  for (int64_t m = 0; m < M; ++m) {
    float* __restrict__ lp = lps + m * kPix;
    {
      const raw *mr = row(mean_ch(0, m)), *sr = row(scale_ch(0, m)), *lg = row(logit_ch(m));
      float* __restrict__ lgt = lgs + m * kPix;
      float* __restrict__ dv = dvs + at(0, m);
      float* __restrict__ dls = dlss + at(0, m);
      for (int64_t p = 0; p < n; ++p) {
        lgt[p] = IO<T>::ld(lg[p]);
        bin_logprob<kGrad>(xr[p], IO<T>::ld(mr[p]), IO<T>::ld(sr[p]), lp[p], kGrad ? dv[p] : dummy,
                           kGrad ? dls[p] : dummy);
      }
    }
    {
      const raw *mg = row(mean_ch(1, m)), *sg = row(scale_ch(1, m)), *k0 = row(coef_ch(0, m));
      float* __restrict__ c0 = coefs + at(0, m);
      float* __restrict__ dv = dvs + at(1, m);
      float* __restrict__ dls = dlss + at(1, m);
      for (int64_t p = 0; p < n; ++p) {
        const float a0 = ftanh(IO<T>::ld(k0[p]));
        float l;
        bin_logprob<kGrad>(xg[p], IO<T>::ld(mg[p]) + a0 * xr[p], IO<T>::ld(sg[p]), l, kGrad ? dv[p] : dummy,
                           kGrad ? dls[p] : dummy);
        lp[p] += l;
        c0[p] = a0;
      }
    }
    {
      const raw *mb = row(mean_ch(2, m)), *sb = row(scale_ch(2, m));
      const raw *k1 = row(coef_ch(1, m)), *k2 = row(coef_ch(2, m));
      float* __restrict__ c1 = coefs + at(1, m);
      float* __restrict__ c2 = coefs + at(2, m);
      float* __restrict__ dv = dvs + at(2, m);
      float* __restrict__ dls = dlss + at(2, m);
      for (int64_t p = 0; p < n; ++p) {
        const float a1 = ftanh(IO<T>::ld(k1[p])), a2 = ftanh(IO<T>::ld(k2[p]));
        float l;
        bin_logprob<kGrad>(xbl[p], IO<T>::ld(mb[p]) + a1 * xr[p] + a2 * xg[p], IO<T>::ld(sb[p]), l,
                           kGrad ? dv[p] : dummy, kGrad ? dls[p] : dummy);
        lp[p] += l;
        c1[p] = a1;
        c2[p] = a2;
      }
    }
  }

  // Pass 2: log_softmax of the logits and logsumexp over components, along the pixels.
  float* __restrict__ e_mix = s.e_mix.data();
  float* __restrict__ e_comp = s.e_comp.data();
  float mx[kPix], sum_mix[kPix], lse_mix[kPix], mx2[kPix], sum_comp[kPix], out[kPix];
  for (int64_t p = 0; p < n; ++p) mx[p] = lgs[p];
  for (int64_t m = 1; m < M; ++m)
    for (int64_t p = 0; p < n; ++p) mx[p] = vmax(mx[p], lgs[m * kPix + p]);
  for (int64_t p = 0; p < n; ++p) sum_mix[p] = 0.0f;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t p = 0; p < n; ++p) {
      const float e = fexp(lgs[m * kPix + p] - mx[p]);
      e_mix[m * kPix + p] = e;
      sum_mix[p] += e;
    }
  for (int64_t p = 0; p < n; ++p) lse_mix[p] = mx[p] + flog(sum_mix[p]);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t p = 0; p < n; ++p) lps[m * kPix + p] += lgs[m * kPix + p] - lse_mix[p];
  for (int64_t p = 0; p < n; ++p) mx2[p] = lps[p];
  for (int64_t m = 1; m < M; ++m)
    for (int64_t p = 0; p < n; ++p) mx2[p] = vmax(mx2[p], lps[m * kPix + p]);
  for (int64_t p = 0; p < n; ++p) sum_comp[p] = 0.0f;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t p = 0; p < n; ++p) {
      const float e = fexp(lps[m * kPix + p] - mx2[p]);
      e_comp[m * kPix + p] = e;
      sum_comp[p] += e;
    }
  for (int64_t p = 0; p < n; ++p) out[p] = mx2[p] + flog(sum_comp[p]);
  float total = 0.0f;
  for (int64_t p = 0; p < n; ++p) total += out[p];  // in pixel order
  if constexpr (!kGrad) return total;

  // Pass 3, gradients: w = posterior weight of a component, pi = its mixture weight.
  float r_comp[kPix], r_mix[kPix];
  for (int64_t p = 0; p < n; ++p) {
    r_comp[p] = 1.0f / sum_comp[p];
    r_mix[p] = 1.0f / sum_mix[p];
  }
  float gx_r[kPix] = {}, gx_g[kPix] = {}, gx_b[kPix] = {};
  for (int64_t m = 0; m < M; ++m) {
    const float* __restrict__ ec = e_comp + m * kPix;
    const float* __restrict__ em = e_mix + m * kPix;
    const float *__restrict__ dv_r = dvs + at(0, m), *__restrict__ dv_g = dvs + at(1, m),
                *__restrict__ dv_b = dvs + at(2, m);
    const float *__restrict__ dls_r = dlss + at(0, m), *__restrict__ dls_g = dlss + at(1, m),
                *__restrict__ dls_b = dlss + at(2, m);
    const float *__restrict__ c0 = coefs + at(0, m), *__restrict__ c1 = coefs + at(1, m),
                *__restrict__ c2 = coefs + at(2, m);
    if (gpb) {
      float* __restrict__ g_logit = gpb + logit_ch(m) * P + p0;
      float* __restrict__ gm_r = gpb + mean_ch(0, m) * P + p0;
      float* __restrict__ gm_g = gpb + mean_ch(1, m) * P + p0;
      float* __restrict__ gm_b = gpb + mean_ch(2, m) * P + p0;
      float* __restrict__ gs_r = gpb + scale_ch(0, m) * P + p0;
      float* __restrict__ gs_g = gpb + scale_ch(1, m) * P + p0;
      float* __restrict__ gs_b = gpb + scale_ch(2, m) * P + p0;
      float* __restrict__ gc_0 = gpb + coef_ch(0, m) * P + p0;
      float* __restrict__ gc_1 = gpb + coef_ch(1, m) * P + p0;
      float* __restrict__ gc_2 = gpb + coef_ch(2, m) * P + p0;
      // Rows of one image are P floats apart, often a multiple of 4 KiB, so they share L1 sets:
      // each loop writes at most four of them.
      for (int64_t p = 0; p < n; ++p) {
        const float w = ec[p] * r_comp[p];
        g_logit[p] = w - em[p] * r_mix[p];
        gm_r[p] = -w * dv_r[p];
        gm_g[p] = -w * dv_g[p];
        gm_b[p] = -w * dv_b[p];
      }
      for (int64_t p = 0; p < n; ++p) {
        const float w = ec[p] * r_comp[p];
        gs_r[p] = w * dls_r[p];
        gs_g[p] = w * dls_g[p];
        gs_b[p] = w * dls_b[p];
      }
      for (int64_t p = 0; p < n; ++p) {
        const float w = ec[p] * r_comp[p];
        gc_0[p] = -w * dv_g[p] * xr[p] * (1.0f - c0[p] * c0[p]);  // tanh' = 1 - tanh^2
        gc_1[p] = -w * dv_b[p] * xr[p] * (1.0f - c1[p] * c1[p]);
        gc_2[p] = -w * dv_b[p] * xg[p] * (1.0f - c2[p] * c2[p]);
      }
    }
    if (gxb) {
      for (int64_t p = 0; p < n; ++p) {
        const float w = ec[p] * r_comp[p];
        gx_r[p] += w * (dv_r[p] - c0[p] * dv_g[p] - c1[p] * dv_b[p]);
        gx_g[p] += w * (dv_g[p] - c2[p] * dv_b[p]);
        gx_b[p] += w * dv_b[p];
      }
    }
  }
  if (gxb) {
    for (int64_t p = 0; p < n; ++p) {
      gxb[p0 + p] = gx_r[p];
      gxb[P + p0 + p] = gx_g[p];
      gxb[2 * P + p0 + p] = gx_b[p];
    }
  }
  return total;
}

}  // namespace

// x (B, 3, H, W) float32; params (B, 10M, H, W) any float dtype. Returns log p(x) (B,) float32
// and the unscaled float32 gradients d log p(x)_b / d params_b and / d x_b (empty when not asked).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dml_log_prob(const at::Tensor& x_in, const at::Tensor& params_in,
                                                            int64_t num_mix, bool need_params, bool need_x) {
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor params = params_in.contiguous();
  const int64_t B = params.size(0), M = num_mix, P = params.size(2) * params.size(3);
  TORCH_CHECK(params.size(1) == 10 * M && x.size(1) == 3 && x.size(0) == B, "dml_log_prob: bad shapes");
  at::Tensor grad_params = empty(params, need_params ? params.sizes() : at::IntArrayRef{0}, at::kFloat);
  at::Tensor grad_x = empty(x, need_x ? x.sizes() : at::IntArrayRef{0}, at::kFloat);
  const int64_t chunks = (P + kPix - 1) / kPix;
  std::vector<float> partial(B * chunks);
  const float* xp = x.const_data_ptr<float>();
  float* gpp = need_params ? grad_params.mutable_data_ptr<float>() : nullptr;
  float* gxp = need_x ? grad_x.mutable_data_ptr<float>() : nullptr;
  DVP_DISPATCH(params.scalar_type(), "dml_log_prob", [&] {
    const auto* pp = in_ptr<scalar_t>(params);
    at::parallel_for(0, B * chunks, 4, [&](int64_t begin, int64_t end) {
      Scratch scratch(M);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / chunks, p0 = (t % chunks) * kPix, n = std::min(kPix, P - p0);
        float* gp = gpp ? gpp + b * 10 * M * P : nullptr;
        float* gx = gxp ? gxp + b * 3 * P : nullptr;
        partial[t] = (gp || gx) ? dml_task<scalar_t, true>(xp + b * 3 * P, pp + b * 10 * M * P, P, p0, n, M, gp, gx, scratch)
                                : dml_task<scalar_t, false>(xp + b * 3 * P, pp + b * 10 * M * P, P, p0, n, M, gp, gx, scratch);
      }
    });
  });
  at::Tensor logp = empty(x, {B}, at::kFloat);
  float* lp = logp.mutable_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    float s = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) s += partial[b * chunks + c];  // in chunk order
    lp[b] = s;
  }
  return {logp, grad_params, grad_x};
}

// out[b, ...] = grad_out[b] * g[b, ...], stored as `dtype`: the whole backward of dml_log_prob.
at::Tensor scale_rows(const at::Tensor& grad_out_in, const at::Tensor& g, at::ScalarType dtype) {
  const at::Tensor grad_out = grad_out_in.to(at::kFloat).contiguous();
  const int64_t B = g.size(0), n = B ? g.numel() / B : 0;
  at::Tensor out = empty(g, g.sizes(), dtype);
  const float* go = grad_out.const_data_ptr<float>();
  const float* gp = g.const_data_ptr<float>();
  DVP_DISPATCH(dtype, "scale_rows", [&] {
    auto* op = out_ptr<scalar_t>(out);
    at::parallel_for(0, B * n, 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end;) {
        const int64_t b = i / n, stop = std::min(end, (b + 1) * n);
        const float scale = go[b];
        for (; i < stop; ++i) op[i] = IO<scalar_t>::st(scale * gp[i]);
      }
    });
  });
  return out;
}

// One sample per pixel: Gumbel-max over the logits with u_mix (B, M, H, W) (at temperature 0 the
// largest logit, u_mix unread), then a logistic draw per colour with u_logistic (B, 3, H, W) (both
// uniform, float32, from torch's generator), coupled R -> G -> B, clamped to [-1, 1] and rounded to
// the 256 levels. Scalar libm math: this mirrors the reference step by step and is not a hot path.
at::Tensor dml_sample(const at::Tensor& params_in, const at::Tensor& u_mix_in, const at::Tensor& u_log_in,
                      double temperature, int64_t num_mix) {
  const at::Tensor params = params_in.contiguous();
  const at::Tensor u_mix = u_mix_in.contiguous(), u_log = u_log_in.contiguous();
  const int64_t B = params.size(0), M = num_mix, H = params.size(2), W = params.size(3), P = H * W;
  at::Tensor out = empty(params, {B, 3, H, W}, at::kFloat);
  const float* um = u_mix.const_data_ptr<float>();
  const float* ul = u_log.const_data_ptr<float>();
  float* op = out.mutable_data_ptr<float>();
  const float temp = static_cast<float>(temperature);
  auto unit = [](float u) { return vmin(vmax(u, 1e-5f), 1.0f - 1e-5f); };
  DVP_DISPATCH(params.scalar_type(), "dml_sample", [&] {
    const auto* pp = in_ptr<scalar_t>(params);
    at::parallel_for(0, B * P, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / P, p = i % P;
        const auto* pb = pp + b * 10 * M * P + p;
        auto at_ch = [&](int64_t c) { return IO<scalar_t>::ld(pb[c * P]); };
        int64_t best = 0;
        float best_score = -INFINITY;
        for (int64_t m = 0; m < M; ++m) {  // first maximum wins, as torch.argmax
          const float gumbel = temp > 0.0f ? -std::log(-std::log(unit(um[(b * M + m) * P + p]))) : 0.0f;
          const float score = at_ch(m) + gumbel;  // temperature 0: the most probable component
          if (score > best_score || m == 0) best = m, best_score = score;
        }
        float v[3], a[3];
        for (int64_t c = 0; c < 3; ++c) {
          const float mean = at_ch(M + c * 3 * M + best);
          const float ls = vmin(vmax(at_ch(M + c * 3 * M + M + best), kLogScaleMin), kLogScaleMax);
          a[c] = std::tanh(at_ch(M + c * 3 * M + 2 * M + best));
          const float u = unit(ul[(b * 3 + c) * P + p]);
          v[c] = mean + temp * std::exp(ls) * (std::log(u) - std::log1p(-u));
        }
        const float x_r = vmin(vmax(v[0], -1.0f), 1.0f);
        const float x_g = vmin(vmax(v[1] + a[0] * x_r, -1.0f), 1.0f);
        const float x_b = vmin(vmax(v[2] + a[1] * x_r + a[2] * x_g, -1.0f), 1.0f);
        const float xs[3] = {x_r, x_g, x_b};
        for (int64_t c = 0; c < 3; ++c)  // nearest of the 256 levels; nearbyint rounds half to even
          op[(b * 3 + c) * P + p] = std::nearbyint((xs[c] + 1.0f) * 127.5f) / 127.5f - 1.0f;
      }
    });
  });
  return out;
}

}  // namespace dvp
