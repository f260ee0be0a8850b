// Registers the kernels as torch operators torch.ops.dvp_fast_cpp.* (CPU only). The autograd
// wiring and the fake (shape-only) implementations live in dvp_fast/ops/<op>_cpp.py.
// TORCH_LIBRARY instead of pybind11 keeps the build light: torch/extension.h alone takes ~35 s
// to compile, torch/library.h ~5 s.
#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY(dvp_fast_cpp, m) {
  m.def("dct_crop(Tensor x, Tensor scale, Tensor basis) -> (Tensor, Tensor)");
  m.def("dct_crop_backward(Tensor grad_y, Tensor ratio, Tensor scale, Tensor basis, bool need_x, "
        "bool need_scale, ScalarType x_dtype) -> (Tensor, Tensor)");
  m.def("idct_pad(Tensor u, Tensor scale, Tensor basis, int size, bool need_mask) -> (Tensor, Tensor)");
  m.def("idct_pad_backward(Tensor grad_out, Tensor mask, Tensor u, Tensor scale, Tensor basis, bool need_u, "
        "bool need_scale) -> (Tensor, Tensor)");
  m.def("gaussian_kl(Tensor[] mu_q, Tensor[] logvar_q, Tensor[] mu_p, Tensor[] logvar_p, Tensor[] noise) "
        "-> (Tensor[], Tensor)");
  m.def("gaussian_kl_backward(Tensor?[] grad_z, Tensor grad_kl, Tensor[] mu_q, Tensor[] logvar_q, "
        "Tensor[] mu_p, Tensor[] logvar_p, Tensor[] noise, int need) -> Tensor[]");
  m.def("dml_log_prob(Tensor x, Tensor params, int num_mix, bool need_params, bool need_x) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("scale_rows(Tensor grad_out, Tensor g, ScalarType dtype) -> Tensor");
  m.def("dml_sample(Tensor params, Tensor u_mix, Tensor u_logistic, float temperature, int num_mix) -> Tensor");
  m.def("conv1x1(Tensor x, Tensor weight, bool silu) -> Tensor");
  m.def("conv1x1_backward(Tensor grad_y, Tensor x, Tensor weight, bool silu, bool need_x, bool need_weight) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dvp_fast_cpp, CPU, m) {
  m.impl("dct_crop", &dvp::dct_crop);
  m.impl("dct_crop_backward", &dvp::dct_crop_backward);
  m.impl("idct_pad", &dvp::idct_pad);
  m.impl("idct_pad_backward", &dvp::idct_pad_backward);
  m.impl("gaussian_kl", &dvp::gaussian_kl);
  m.impl("gaussian_kl_backward", &dvp::gaussian_kl_backward);
  m.impl("dml_log_prob", &dvp::dml_log_prob);
  m.impl("scale_rows", &dvp::scale_rows);
  m.impl("dml_sample", &dvp::dml_sample);
  m.impl("conv1x1", &dvp::conv1x1);
  m.impl("conv1x1_backward", &dvp::conv1x1_backward);
}
