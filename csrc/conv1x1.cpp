// 1x1 convolution with an optional SiLU on its input, as batched GEMMs:
//   y[b] = W act(x[b]) + bias,   act = SiLU or the identity,   x[b]: Cin x HW,   W: Cout x Cin.
// The residual blocks run SiLU -> 1x1 conv many times per step; fusing the two saves the SiLU's
// trip through memory and its saved output, and the backward's separate silu_backward pass.
// oneDNN's 1x1 convolution backward is also slow on these small channel counts (3-5x its forward).
//
// The batch is cut into chunks of a few samples, one task each. Per chunk, act(x) is written to an
// L2-sized float32 buffer A (n x (Cin + 1) x HW, each sample's last row all ones so that the bias
// rides in the GEMM as W's last column), then ATen's batched GEMM (MKL or oneDNN) reads the NCHW
// tensors where they lie and writes y or dx in place. Every sample's products are computed alone
// and the weight gradient is one (Cout, Cin + 1) product per sample, summed in sample order, so the
// chunking may follow the thread count while the results do not. That product's reduction over HW is
// cut into blocks of kReductionColumns, accumulated in order: MKL run outside a parallel region (a
// single chunk) splits a longer reduction across its threads, whose number then changes the rounding
// (measured on an Intel Xeon: K = 784 differs between 1 and 2 threads, K <= 512 does not).
// Inputs may be float32 or bfloat16; the arithmetic is float32.
#include "common.h"

namespace dvp {
namespace {

constexpr int64_t kColumnsPerChunk = 2048;  // ~0.5 MB of float32 buffers per chunk at 32 channels
constexpr int64_t kChunksPerThread = 4;     // so that uneven chunks still balance across threads
constexpr int64_t kReductionColumns = 256;  // HW columns per weight-gradient GEMM (see the top)

// Up to kColumnsPerChunk GEMM columns per chunk (fewer and the per-call overhead shows), but no
// fewer than kChunksPerThread chunks per thread where the batch allows it.
int64_t samples_per_chunk(int64_t batch, int64_t hw) {
  const int64_t by_size = kColumnsPerChunk / std::max<int64_t>(hw, 1);
  const int64_t tasks = kChunksPerThread * at::get_num_threads();
  const int64_t by_threads = (batch + tasks - 1) / tasks;
  return std::max<int64_t>(1, std::min(by_size, by_threads));
}

DVP_INLINE float sigmoid(float v) { return 1.0f / (1.0f + fexp(-v)); }

// For the n samples x points at: a[j, i, p] = act(x[j, i, p]) for i < cin and a[j, cin, p] = 1 (when a
// is given), and deriv = act'(x), laid out as x (when deriv is given; silu only).
template <typename T>
void fill_input(const typename IO<T>::raw* __restrict__ x, float* __restrict__ a, float* __restrict__ deriv,
                int64_t n, int64_t cin, int64_t hw, bool silu) {
  for (int64_t j = 0; j < n; ++j) {
    const typename IO<T>::raw* __restrict__ src = x + j * cin * hw;
    float* __restrict__ dst = a != nullptr ? a + j * (cin + 1) * hw : nullptr;
    float* __restrict__ der = deriv != nullptr ? deriv + j * cin * hw : nullptr;
    if (silu && dst != nullptr && der != nullptr) {
      for (int64_t k = 0; k < cin * hw; ++k) {
        const float v = IO<T>::ld(src[k]), s = sigmoid(v);
        dst[k] = v * s;
        der[k] = s * (1.0f + v * (1.0f - s));
      }
    } else if (silu && der != nullptr) {
      for (int64_t k = 0; k < cin * hw; ++k) {
        const float v = IO<T>::ld(src[k]), s = sigmoid(v);
        der[k] = s * (1.0f + v * (1.0f - s));
      }
    } else if (silu) {
      for (int64_t k = 0; k < cin * hw; ++k) {
        const float v = IO<T>::ld(src[k]);
        dst[k] = v * sigmoid(v);
      }
    } else {
      for (int64_t k = 0; k < cin * hw; ++k) dst[k] = IO<T>::ld(src[k]);
    }
    if (dst != nullptr)
      for (int64_t p = 0; p < hw; ++p) dst[cin * hw + p] = 1.0f;
  }
}

// out = d * deriv elementwise (the SiLU's chain rule), or out = d without deriv.
template <typename T>
void store_input_grad(const float* __restrict__ d, const float* __restrict__ deriv,
                      typename IO<T>::raw* __restrict__ out, int64_t count) {
  if (deriv != nullptr) {
    for (int64_t k = 0; k < count; ++k) out[k] = IO<T>::st(d[k] * deriv[k]);
  } else {
    for (int64_t k = 0; k < count; ++k) out[k] = IO<T>::st(d[k]);
  }
}

template <typename T>
void load_floats(const typename IO<T>::raw* __restrict__ src, float* __restrict__ dst, int64_t count) {
  for (int64_t k = 0; k < count; ++k) dst[k] = IO<T>::ld(src[k]);
}

template <typename T>
void store_floats(const float* __restrict__ src, typename IO<T>::raw* __restrict__ dst, int64_t count) {
  for (int64_t k = 0; k < count; ++k) dst[k] = IO<T>::st(src[k]);
}

struct Shape {
  int64_t batch, cin, cout, hw, per_chunk, chunks;
};

Shape check_shapes(const char* name, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), name, ": x must be a contiguous (B, Cin, H, W) tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.scalar_type() == at::kFloat, name,
              ": weight must be a contiguous float32 (Cout, Cin + 1) matrix, bias last");
  TORCH_CHECK(weight.size(1) == x.size(1) + 1, name, ": weight has ", weight.size(1), " columns for ", x.size(1),
              " input channels (expected Cin + 1)");
  Shape s{x.size(0), x.size(1), weight.size(0), x.size(2) * x.size(3), 0, 0};
  s.per_chunk = samples_per_chunk(s.batch, s.hw);
  s.chunks = (s.batch + s.per_chunk - 1) / s.per_chunk;
  return s;
}

// Samples [b0, b0 + n) of an NCHW tensor as an (n, C, HW) view.
at::Tensor samples(const at::Tensor& t, int64_t b0, int64_t n, int64_t hw) {
  return t.narrow(0, b0, n).view({n, t.size(1), hw});
}

at::Tensor scratch(const at::Tensor& like, at::IntArrayRef sizes) { return empty(like, sizes, at::kFloat); }

}  // namespace

at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& weight, bool silu) {
  const Shape s = check_shapes("conv1x1", x, weight);
  at::Tensor y = empty(x, {s.batch, s.cout, x.size(2), x.size(3)}, x.scalar_type());
  if (s.batch == 0 || s.hw == 0) return y;
  DVP_DISPATCH(x.scalar_type(), "conv1x1", [&] {
    constexpr bool kFloat = std::is_same_v<scalar_t, float>;
    const auto* xp = in_ptr<scalar_t>(x);
    auto* yp = out_ptr<scalar_t>(y);
    at::parallel_for(0, s.chunks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor a = scratch(x, {s.per_chunk, s.cin + 1, s.hw});
      at::Tensor o = kFloat ? at::Tensor() : scratch(x, {s.per_chunk, s.cout, s.hw});
      for (int64_t c = begin; c < end; ++c) {
        const int64_t b0 = c * s.per_chunk, n = std::min(s.per_chunk, s.batch - b0);
        fill_input<scalar_t>(xp + b0 * s.cin * s.hw, a.mutable_data_ptr<float>(), nullptr, n, s.cin, s.hw, silu);
        at::Tensor out = kFloat ? samples(y, b0, n, s.hw) : o.narrow(0, 0, n);
        out.baddbmm_(weight.expand({n, s.cout, s.cin + 1}), a.narrow(0, 0, n), 0.0, 1.0);
        if constexpr (!kFloat)
          store_floats<scalar_t>(o.const_data_ptr<float>(), yp + b0 * s.cout * s.hw, n * s.cout * s.hw);
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> conv1x1_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                    const at::Tensor& weight, bool silu, bool need_x,
                                                    bool need_weight) {
  const Shape s = check_shapes("conv1x1_backward", x, weight);
  TORCH_CHECK(grad_y.is_contiguous() && grad_y.scalar_type() == x.scalar_type() && grad_y.dim() == 4 &&
                  grad_y.size(0) == s.batch && grad_y.size(1) == s.cout && grad_y.size(2) * grad_y.size(3) == s.hw,
              "conv1x1_backward: grad_y must be a contiguous (B, Cout, H, W) tensor of x's dtype");
  at::Tensor gx = empty(x, need_x ? x.sizes() : at::IntArrayRef{0}, x.scalar_type());
  at::Tensor gw = empty(x, need_weight ? weight.sizes() : at::IntArrayRef{0}, at::kFloat);
  if (need_weight) gw.zero_();
  if (s.batch == 0 || s.hw == 0 || (!need_x && !need_weight)) return {gx, gw};
  // One weight-gradient partial per sample, summed in sample order at the end.
  at::Tensor partials = scratch(x, {need_weight ? s.batch : 0, s.cout, s.cin + 1});
  const at::Tensor w_in_t = weight.narrow(1, 0, s.cin).t();  // the bias column gets no input gradient
  DVP_DISPATCH(x.scalar_type(), "conv1x1_backward", [&] {
    constexpr bool kFloat = std::is_same_v<scalar_t, float>;
    const auto* xp = in_ptr<scalar_t>(x);
    const auto* gp = in_ptr<scalar_t>(grad_y);
    auto* gxp = need_x ? out_ptr<scalar_t>(gx) : nullptr;
    at::parallel_for(0, s.chunks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor a = need_weight ? scratch(x, {s.per_chunk, s.cin + 1, s.hw}) : at::Tensor();
      at::Tensor d = need_x ? scratch(x, {s.per_chunk, s.cin, s.hw}) : at::Tensor();
      at::Tensor deriv = need_x && silu ? scratch(x, {s.per_chunk, s.cin, s.hw}) : at::Tensor();
      at::Tensor g32 = kFloat ? at::Tensor() : scratch(x, {s.per_chunk, s.cout, s.hw});
      for (int64_t c = begin; c < end; ++c) {
        const int64_t b0 = c * s.per_chunk, n = std::min(s.per_chunk, s.batch - b0);
        at::Tensor g;
        if constexpr (kFloat) {
          g = samples(grad_y, b0, n, s.hw);
        } else {
          load_floats<scalar_t>(gp + b0 * s.cout * s.hw, g32.mutable_data_ptr<float>(), n * s.cout * s.hw);
          g = g32.narrow(0, 0, n);
        }
        // act(X) for the weight gradient and act'(X) for the input gradient, from one read of X.
        if (need_weight || silu)
          fill_input<scalar_t>(xp + b0 * s.cin * s.hw, need_weight ? a.mutable_data_ptr<float>() : nullptr,
                               deriv.defined() ? deriv.mutable_data_ptr<float>() : nullptr, n, s.cin, s.hw, silu);
        if (need_weight) {  // dW'[b] = G[b] act(X[b])^T; the row of ones gives the bias gradient
          at::Tensor dw = partials.narrow(0, b0, n), an = a.narrow(0, 0, n);
          for (int64_t p0 = 0; p0 < s.hw; p0 += kReductionColumns) {
            const int64_t len = std::min(kReductionColumns, s.hw - p0);
            dw.baddbmm_(g.narrow(2, p0, len), an.narrow(2, p0, len).transpose(1, 2), p0 == 0 ? 0.0 : 1.0, 1.0);
          }
        }
        if (need_x) {  // dX = act'(X) * (W^T G)
          const bool direct = kFloat && !silu;
          at::Tensor dx = direct ? samples(gx, b0, n, s.hw) : d.narrow(0, 0, n);
          dx.baddbmm_(w_in_t.expand({n, s.cin, s.cout}), g, 0.0, 1.0);
          if (!direct)
            store_input_grad<scalar_t>(d.const_data_ptr<float>(), silu ? deriv.const_data_ptr<float>() : nullptr,
                                       gxp + b0 * s.cin * s.hw, n * s.cin * s.hw);
        }
      }
    });
  });
  if (need_weight) {  // sample order, whatever the threads did
    const float* pp = partials.const_data_ptr<float>();
    float* wp = gw.mutable_data_ptr<float>();
    const int64_t k = s.cout * (s.cin + 1);
    for (int64_t b = 0; b < s.batch; ++b)
      for (int64_t i = 0; i < k; ++i) wp[i] += pp[b * k + i];
  }
  return {gx, gw};
}

}  // namespace dvp
