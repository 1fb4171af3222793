// The Python module kosmos2_cpu_kernels: every CPU kernel of kosmos2/cpu/ in one extension (kosmos2/cpu/extension.py
// compiles and loads it).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_gemv", &bf16_gemv, "y = x @ weight.T for a bf16 weight and 1..8 rows of x, fp32 out",
        py::arg("x"), py::arg("weight"), py::arg("allow_avx512") = true);
  m.def("bf16_linear", &bf16_linear, "F.linear(x, weight, bias) for a bf16 weight and 1..8 rows, in x's dtype",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("allow_avx512") = true);
  m.def("vnni_linear", &vnni_linear, "F.linear for bf16 x (any rows) and a weight packed by pack_vnni (AVX512-BF16)",
        py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("N"));
  m.def("decode_attention", &decode_attention, "one decoding step of attention: append k/v to the fp32 cache at "
        "`start` and attend with q (rows [B, H*D])", py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("start"), py::arg("allowed") = py::none());
  m.def("decode_layer", &decode_layer, "one decoding step of a whole decoder layer with VNNI-packed bf16 linears",
        py::arg("x"), py::arg("norms"), py::arg("linears"), py::arg("biases"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("start"), py::arg("allowed"), py::arg("gelu_table"), py::arg("eps"));
  m.def("train_attention_forward", &train_attention_forward, "fp32 attention for training: (out, log-sum-exp) of "
        "q, k, v [B, H, T, D]; causal aligns the queries to the last keys", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("causal"));
  m.def("train_attention_backward", &train_attention_backward, "(dq, dk, dv) of train_attention_forward",
        py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("causal"));
  m.def("has_avx512_bf16", &cpu_has_avx512_bf16, "whether bf16 x takes the AVX512-BF16 path on this CPU");
}
