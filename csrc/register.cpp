// Schemas of every CPU op and the Python module that loads them (shvit_kernels._C); the
// kernels register their implementations in their own files (TORCH_LIBRARY_IMPL).
//
// The public ops live in the `shvit` namespace (defined in Python, shvit_kernels/*.py);
// their CPU implementation calls these `shvit_cpp` ops when the backend is `cpp`, so that
// SHVIT_KERNELS_BACKEND can still route CPU tensors to Triton's interpreter or to torch.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace shvit_cpu {
bool gemm_available();       // inference/conv_infer.cpp: whether the packed-GEMM kernels run
bool bf16_gemm_available();  // inference/conv_bf16.cpp: whether the bfloat16 GEMM runs
std::string bf16_gemm_kernel(const std::string& kernel);  // inference/conv_bf16.cpp: "amx" | "avx512_bf16" | ""
}  // namespace shvit_cpu
namespace shvit_isa {  // cpu_isa.cpp: the instruction-set level in use
std::string request(const std::string& level);
}  // namespace shvit_isa

extern "C" {
// Importing shvit_kernels._C runs the static registrations below; the module is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(shvit_cpp, m) {
  m.def("gn_partial_fwd(Tensor x1, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("gn_partial_bwd(Tensor dy, Tensor x1, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
  m.def("shsa_attn_fwd(Tensor qkv, Tensor x2, int qk_dim, float scale) -> (Tensor, Tensor)");
  m.def("shsa_attn_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse, int qk_dim, float scale) -> (Tensor, Tensor)");
  m.def("shsa_infer(Tensor x, Tensor weight, Tensor bias, int pdim, int qk_dim, float eps) -> Tensor");
  m.def(
      "shsa_block_infer(Tensor x, Tensor w_qkv, Tensor b_qkv, Tensor w_proj, Tensor b_proj, int pdim, int qk_dim, "
      "float eps, Tensor? w_qkv_packed=None, Tensor? w_proj_packed=None) -> Tensor");
  m.def("gn_rows(Tensor x, int pdim, float eps) -> Tensor");
  m.def("attend_concat_relu(Tensor qkv, Tensor x, int pdim, int qk_dim) -> Tensor");
  m.def("pack_weight(Tensor w) -> Tensor");
  m.def("pw_conv(Tensor x, Tensor w_packed, Tensor bias, bool relu, Tensor? residual) -> Tensor");
  m.def("conv3x3(Tensor x, Tensor w_packed, Tensor bias, int stride, bool relu) -> Tensor");
  m.def("stem_conv3x3(Tensor x, Tensor weight, Tensor bias, int stride, bool relu) -> Tensor");
  m.def("stem_conv3x3_bf16(Tensor x, Tensor weight, Tensor bias, int stride, bool relu) -> Tensor");
  m.def("dw_conv3x3(Tensor x, Tensor weight, Tensor bias, int stride, bool relu) -> Tensor");
  m.def("ffn_block(Tensor x, Tensor w1_packed, Tensor b1, Tensor w2_packed, Tensor b2) -> Tensor");
  m.def("se_gate(Tensor x, Tensor w1_packed, Tensor b1, Tensor w2_packed, Tensor b2) -> Tensor");
  m.def("pool_linear(Tensor x, Tensor w_packed, Tensor bias) -> Tensor");
  m.def("pack_weight_bf16(Tensor w) -> Tensor");
  m.def("bf16_pw(Tensor x, Tensor w_packed, Tensor bias, bool relu, Tensor? residual) -> Tensor");
  m.def("bf16_conv3x3(Tensor x, Tensor w_packed, Tensor bias, int stride, bool relu) -> Tensor");
  m.def("bf16_ffn(Tensor x, Tensor w1_packed, Tensor b1, Tensor w2_packed, Tensor b2) -> Tensor");
  m.def("bf16_shsa(Tensor x, Tensor w_qkv, Tensor b_qkv, Tensor w_proj, Tensor b_proj, int pdim, int qk_dim, "
        "float eps) -> Tensor");
  m.def("bf16_se(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor");
  m.def("bf16_pool_linear(Tensor x, Tensor w, Tensor b) -> Tensor");
  // with C++ autograd (ops/autograd.cpp): forward and backward without Python
  m.def("group_norm_partial(Tensor x1, Tensor weight, Tensor bias, float eps) -> Tensor");
  m.def("shsa_attention(Tensor qkv, Tensor x2, int qk_dim, float scale) -> Tensor");
  m.def("gemm_available() -> bool", &shvit_cpu::gemm_available);
  m.def("bf16_gemm_available() -> bool", &shvit_cpu::bf16_gemm_available);
  m.def("bf16_gemm_kernel(str kernel='') -> str", &shvit_cpu::bf16_gemm_kernel);
  m.def("isa(str level='') -> str", &shvit_isa::request);
}
