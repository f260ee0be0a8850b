// Shared helpers of the native CPU kernels: dtype loads/stores, branch-free float math
// that the compiler vectorises, and the op declarations bound in bindings.cpp.
//
// Only light ATen headers are included: torch/extension.h costs ~35 s per file to compile and
// even <ATen/ops/empty.h> ~8 s, so tensors are allocated through Tensor methods (new_empty).
// Every kernel computes in float32 whatever the storage dtype, and every reduction has a
// fixed order that does not depend on the number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace dvp {

// ---------------------------------------------------------------- C++17
// The sources are C++17: torch's extension builder compiles with -std=c++17 in older torch
// releases (2.11 among them) and with -std=c++20 in newer ones, and passes the flag itself.
// std::bit_cast is C++20, hence this memcpy form; GCC and Clang compile a fixed-size memcpy
// between scalars to a plain register move, so loops using it still vectorise.
template <typename To, typename From>
inline __attribute__((always_inline)) To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  static_assert(std::is_trivially_copyable<To>::value && std::is_trivially_copyable<From>::value,
                "bit_cast: types must be trivially copyable");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// ---------------------------------------------------------------- storage dtypes
// IO<T>::raw is what the kernels read and write; bf16 is handled as raw bits so that the
// conversions are plain integer ops the compiler vectorises.
template <typename T>
struct IO;

template <>
struct IO<float> {
  using raw = float;
  static inline float ld(float v) { return v; }
  static inline float st(float v) { return v; }
};

template <>
struct IO<c10::BFloat16> {
  using raw = uint16_t;
  static inline float ld(uint16_t v) { return dvp::bit_cast<float>(static_cast<uint32_t>(v) << 16); }
  // Round to nearest even, as torch's .to(torch.bfloat16); NaN stays a quiet NaN.
  static inline uint16_t st(float v) {
    uint32_t u = dvp::bit_cast<uint32_t>(v);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(v != v ? 0x7FC0u : r);
  }
};

// A new uninitialised tensor of `dtype` (CPU, contiguous). Tensor::new_empty dispatches to
// at::empty, so torch's deterministic NaN fill of uninitialised memory still applies.
inline at::Tensor empty(const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype) {
  return like.new_empty(sizes, like.options().dtype(dtype));
}

template <typename T>
inline const typename IO<T>::raw* in_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename IO<T>::raw*>(t.const_data_ptr());
}

template <typename T>
inline typename IO<T>::raw* out_ptr(at::Tensor& t) {
  return reinterpret_cast<typename IO<T>::raw*>(t.mutable_data_ptr());
}

// Kernels are instantiated for float32 and bfloat16 only (each dtype costs compile time);
// cpp_backend.py converts float16 and float64 tensors to float32 before calling them.
#define DVP_DISPATCH(dtype, name, ...)                                            \
  [&] {                                                                           \
    switch (dtype) {                                                              \
      case at::kFloat: {                                                          \
        using scalar_t = float;                                                   \
        return __VA_ARGS__();                                                     \
      }                                                                           \
      case at::kBFloat16: {                                                       \
        using scalar_t = c10::BFloat16;                                           \
        return __VA_ARGS__();                                                     \
      }                                                                           \
      default:                                                                    \
        TORCH_CHECK(false, name ": expected float32 or bfloat16, got ", dtype);  \
    }                                                                             \
  }()

// ---------------------------------------------------------------- vectorisable math
// Branch-free float32 versions (Cephes polynomials, max error ~2 ulp on the ranges used).
// Written with selects and bit casts only, so loops calling them vectorise at -O3; std::exp
// and friends would not without -ffast-math, which we avoid (it changes results elsewhere).

// The math helpers must be inlined into the calling loop, or it cannot vectorise; GCC's
// heuristics decline on the larger ones, hence always_inline.
#define DVP_INLINE inline __attribute__((always_inline))

// max/min as value selects: they vectorise (maxps/minps); std::max returns a reference, which
// GCC treats as control flow and then refuses to vectorise the loop. A NaN in `a` propagates,
// as in torch.clamp.
DVP_INLINE float vmax(float a, float b) { return a < b ? b : a; }
DVP_INLINE float vmin(float a, float b) { return a > b ? b : a; }

// e^x for x in [-87.3, 88.7] (clamped there: e^-87.3 ~ 1.2e-38 stands in for underflow).
DVP_INLINE float fexp(float x) {
  x = vmin(vmax(x, -87.3f), 88.7f);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (exact for |n| < 2^22, no call to rint).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;  // Cody-Waite: ln 2 = 0.693359375 - 2.12194440e-4
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * dvp::bit_cast<float>(bits);
}

// ln x for normal positive x (callers clamp below at 1e-30).
DVP_INLINE float flog(float x) {
  const int32_t bits = dvp::bit_cast<int32_t>(x);
  float e = static_cast<float>(((bits >> 23) & 0xFF) - 126);
  float m = dvp::bit_cast<float>((bits & 0x007FFFFF) | 0x3F000000);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float y = p * m * z;
  y = y - 2.12194440e-4f * e;
  y = y - 0.5f * z;
  return m + y + 0.693359375f * e;
}

// tanh x: odd polynomial below |x| = 0.625, 1 - 2 / (e^{2|x|} + 1) above.
DVP_INLINE float ftanh(float x) {
  const float a = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float big = 1.0f - 2.0f / (fexp(2.0f * a) + 1.0f);
  return a < 0.625f ? small : (x < 0.0f ? -big : big);
}

// ---------------------------------------------------------------- op declarations
// dct.cpp
std::tuple<at::Tensor, at::Tensor> dct_crop(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& basis);
std::tuple<at::Tensor, at::Tensor> dct_crop_backward(const at::Tensor& grad_y, const at::Tensor& ratio,
                                                     const at::Tensor& scale, const at::Tensor& basis,
                                                     bool need_x, bool need_scale, at::ScalarType x_dtype);
std::tuple<at::Tensor, at::Tensor> idct_pad(const at::Tensor& u, const at::Tensor& scale, const at::Tensor& basis,
                                            int64_t size, bool need_mask);
std::tuple<at::Tensor, at::Tensor> idct_pad_backward(const at::Tensor& grad_out, const at::Tensor& mask,
                                                     const at::Tensor& u, const at::Tensor& scale,
                                                     const at::Tensor& basis, bool need_u, bool need_scale);
// gaussian_kl.cpp
std::tuple<std::vector<at::Tensor>, at::Tensor> gaussian_kl(at::TensorList mu_q, at::TensorList logvar_q,
                                                            at::TensorList mu_p, at::TensorList logvar_p,
                                                            at::TensorList noise);
std::vector<at::Tensor> gaussian_kl_backward(const c10::List<std::optional<at::Tensor>>& grad_z,
                                             const at::Tensor& grad_kl, at::TensorList mu_q,
                                             at::TensorList logvar_q, at::TensorList mu_p,
                                             at::TensorList logvar_p, at::TensorList noise, int64_t need);
// dml.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> dml_log_prob(const at::Tensor& x, const at::Tensor& params,
                                                            int64_t num_mix, bool need_params, bool need_x);
at::Tensor scale_rows(const at::Tensor& grad_out, const at::Tensor& g, at::ScalarType dtype);
at::Tensor dml_sample(const at::Tensor& params, const at::Tensor& u_mix, const at::Tensor& u_logistic,
                      double temperature, int64_t num_mix);
// conv1x1.cpp
at::Tensor conv1x1(const at::Tensor& x, const at::Tensor& weight, bool silu);
std::tuple<at::Tensor, at::Tensor> conv1x1_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                    const at::Tensor& weight, bool silu, bool need_x,
                                                    bool need_weight);

}  // namespace dvp
