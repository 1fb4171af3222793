"""Our bf16 CPU linears (kosmos2/cpu/bf16_linear.py, csrc/bf16_gemv.cpp): the row-major GEMV (AVX2, and its
AVX512-BF16 variant for bf16 rows) and the AVX512-BF16 kernel on the packed "VNNI" layout. Every kernel is checked
against a float64 product of the same bf16 values; the AVX512-BF16 tests skip on CPUs without it (the AVX2 ones run
there too), every kernel test where the kernels are unavailable (tests/test_cpu_backend.py checks that they build
wherever they can)."""
import copy

import pytest
import torch
import torch.nn as nn

from kosmos2 import build_model
from kosmos2.cpu import bf16_linear as gemv, extension

from helpers import greedy, image_prompt, small_config

needs_kernel = pytest.mark.skipif(not extension.available(),
                                  reason=f"CPU kernels unavailable: {extension.unavailable_reason()}")
needs_avx512_bf16 = pytest.mark.skipif(not extension.has_avx512_bf16(),
                                       reason="this CPU has no AVX512-BF16 (or the kernels are unavailable)")


@needs_kernel
@pytest.mark.parametrize("allow_avx512", [False, True])  # False: the AVX2 loop, also on AVX512 CPUs
@pytest.mark.parametrize("rows", range(1, 9))
@pytest.mark.parametrize("n, k", [(1, 16), (7, 48), (130, 64), (1031, 2048)])
def test_kernel_equals_a_float64_product(rows, n, k, allow_avx512):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    weight = torch.randn(n, k, generator=g).bfloat16()
    x = torch.randn(rows, k, generator=g).bfloat16()
    y = extension.kernels().bf16_gemv(x, weight, allow_avx512=allow_avx512)
    exact = x.double() @ weight.double().T  # bf16 inputs are exact in float64: only the kernel's fp32 sums differ
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert (y.double() - exact).abs().max().item() <= 1e-5 * k ** 0.5 * exact.abs().max().item()


@needs_kernel
def test_kernel_takes_any_float_rows_and_strides():
    weight = torch.randn(40, 32).bfloat16()
    x = torch.randn(32, 3).T  # fp32, non-contiguous
    assert torch.allclose(extension.kernels().bf16_gemv(x, weight), x @ weight.float().T, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("x, weight, message", [
    (torch.randn(9, 16), torch.randn(4, 16).bfloat16(), "1..8 rows"),
    (torch.randn(1, 24), torch.randn(4, 24).bfloat16(), "multiple of 16"),
    (torch.randn(1, 16), torch.randn(4, 16), "bf16"),
    (torch.randn(1, 32), torch.randn(4, 16).bfloat16(), "K = weight.size"),
])
def test_kernel_refuses_what_it_cannot_compute(x, weight, message):
    with pytest.raises(RuntimeError, match=message):
        extension.kernels().bf16_gemv(x, weight)


@pytest.fixture(scope="module")
def bf16_models():
    torch.manual_seed(0)
    cfg = small_config(dropout=0.0, attention_dropout=0.0)
    plain = build_model(cfg, dtype=torch.bfloat16).eval()
    fast = copy.deepcopy(plain)
    swapped = gemv.use_bf16_cpu_linears(fast)
    return cfg, plain, fast, swapped


@needs_kernel
def test_swapped_model_keeps_its_parameters_and_state_dict(bf16_models):
    _, plain, fast, swapped = bf16_models
    linears = [m for m in plain.modules() if type(m) is nn.Linear]
    assert swapped == len(linears) > 0
    assert not any(type(m) is nn.Linear for m in fast.modules())
    head = fast.decoder.output_projection
    assert isinstance(head, gemv.Bf16CpuLinear) and head.weight is fast.decoder.embed_tokens.weight  # still tied
    ours, ref = fast.state_dict(), plain.state_dict()
    assert list(ours) == list(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize("models", [pytest.param("bf16_models", marks=needs_kernel),
                                    pytest.param("vnni_models", marks=needs_avx512_bf16)])
@torch.no_grad()
def test_swapped_model_decodes_like_the_plain_one(models, request):
    """The AVX2 bf16 GEMV path and the AVX512-BF16 (VNNI) path each decode like the plain bf16 model."""
    cfg, plain, fast, _ = request.getfixturevalue(models)
    ids, mask, pixels = image_prompt(cfg, text_len=4)
    pixels = pixels.bfloat16()
    ref, ours = greedy(plain, ids, mask, pixels, 6).float(), greedy(fast, ids, mask, pixels, 6).float()
    # both round each product to bf16; only the fp32 summation order differs
    assert (ref - ours).abs().max().item() <= 0.02 * ref.abs().max().item()
    assert torch.equal(ref.argmax(-1), ours.argmax(-1))


@needs_kernel
def test_training_through_a_swapped_linear_uses_autograd():
    linear = nn.Linear(32, 8).bfloat16()
    fast = gemv.Bf16CpuLinear(linear)
    x = torch.randn(1, 32).bfloat16()
    fast(x).float().sum().backward()  # weight requires grad: F.linear, with gradients
    expected = x.float().T.expand(-1, 8).T  # d(sum y)/dW = x for every output row
    assert torch.allclose(linear.weight.grad.float(), expected)


@needs_kernel
@torch.no_grad()
def test_prefill_rows_accumulate_in_fp32_and_round_to_bf16():
    linear = nn.Linear(32, 8).bfloat16()
    fast = gemv.Bf16CpuLinear(linear)
    x = torch.randn(2, 10, 32).bfloat16()  # 20 rows: not a decode step (fp32 GEMM, or native bf16 on AVX512-BF16)
    y = fast(x)
    expected = x.float() @ linear.weight.float().T + linear.bias.float()
    assert y.dtype == torch.bfloat16 and y.shape == (2, 10, 8)
    assert torch.allclose(y.float(), expected, rtol=2 ** -7, atol=1e-6)  # within bf16 rounding


@needs_kernel
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_linear_entry_adds_the_bias_and_rounds_once_to_the_input_dtype(x_dtype):
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(70, 64, generator=g).bfloat16(), torch.randn(70, generator=g).bfloat16()
    x = torch.randn(3, 64, generator=g).to(x_dtype)
    y = extension.kernels().bf16_linear(x, weight, bias)
    exact = x.double() @ weight.double().T + bias.double()
    assert y.dtype == x_dtype and y.shape == (3, 70)
    tolerance = 2 ** -8 if x_dtype == torch.bfloat16 else 1e-5  # one bf16 rounding, or fp32 summation order only
    assert torch.allclose(y.double(), exact, rtol=tolerance, atol=1e-5)
    assert torch.equal(extension.kernels().bf16_linear(x, weight, None).float(),
                       extension.kernels().bf16_gemv(x, weight).to(x_dtype).float())


# ---- the AVX512-BF16 kernel on the packed ("VNNI") layout


def test_vnni_layout_puts_16_columns_and_2_inputs_in_each_64_byte_chunk():
    weight = torch.arange(40 * 32, dtype=torch.float32).view(40, 32).bfloat16()  # exact: all values < 256 * 8
    packed = gemv.pack_vnni(weight)
    assert packed.shape == (4, 16, 16, 2)  # 40 columns padded to 64 = 4 blocks of 16; K/2 = 16 pairs
    # packed[block, pair, column, j] = weight[16 * block + column, 2 * pair + j]; padding rows are zero
    assert packed[0, 0, 0].tolist() == [0, 1] and packed[0, 0, 1].tolist() == [32, 33]
    assert packed[1, 3, 2].tolist() == [weight[18, 6].item(), weight[18, 7].item()]
    assert packed[2, 15, 7].tolist() == [weight[39, 30].item(), weight[39, 31].item()]
    assert not packed[2, :, 8:].any() and not packed[3].any()
    assert torch.equal(gemv.unpack_vnni(packed, 40), weight)
    with pytest.raises(ValueError, match="multiple of 16"):
        gemv.pack_vnni(torch.zeros(4, 24).bfloat16())


@needs_avx512_bf16
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17, 71])
@pytest.mark.parametrize("n, k", [(1, 16), (7, 48), (33, 64), (1031, 2048)])
def test_vnni_kernel_equals_a_float64_product(rows, n, k):
    g = torch.Generator().manual_seed(rows * 1000 + n)
    weight, bias = torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g).bfloat16()
    x = torch.randn(rows, k, generator=g).bfloat16()
    y = gemv.vnni_linear(x, gemv.pack_vnni(weight), bias, n)
    exact = x.double() @ weight.double().T + bias.double()
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    # fp32 sums in another order, then one rounding to bf16
    assert torch.allclose(y.double(), exact, rtol=2 ** -8, atol=1e-5 * k ** 0.5 * exact.abs().max().item())


@needs_avx512_bf16
def test_vnni_kernel_refuses_what_it_cannot_compute():
    packed = gemv.pack_vnni(torch.randn(40, 32).bfloat16())
    with pytest.raises(RuntimeError, match="bf16"):
        gemv.vnni_linear(torch.randn(1, 32), packed, None, 40)  # fp32 rows
    with pytest.raises(RuntimeError, match="K = 32"):
        gemv.vnni_linear(torch.randn(1, 48).bfloat16(), packed, None, 40)
    with pytest.raises(RuntimeError, match="N match"):
        gemv.vnni_linear(torch.randn(1, 32).bfloat16(), packed, None, 70)


@pytest.fixture(scope="module")
def vnni_models():
    torch.manual_seed(0)
    cfg = small_config(dropout=0.0, attention_dropout=0.0)
    plain = build_model(cfg, dtype=torch.bfloat16).eval()
    fast = copy.deepcopy(plain)
    return cfg, plain, fast, gemv.use_bf16_vnni_linears(fast)


@needs_avx512_bf16
def test_vnni_model_keeps_its_state_dict_and_reloads_it(vnni_models):
    cfg, plain, fast, swapped = vnni_models
    assert swapped == sum(type(m) is nn.Linear for m in plain.modules()) > 0
    assert isinstance(fast.decoder.output_projection, gemv.Bf16VnniLinear)
    ours, ref = fast.state_dict(), plain.state_dict()
    assert list(ours) == list(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    other = build_model(cfg, dtype=torch.bfloat16).eval()
    gemv.use_bf16_vnni_linears(other)
    other.load_state_dict(ref)  # repacks every weight
    assert all(torch.equal(v, ref[k]) for k, v in other.state_dict().items())
    with pytest.raises(RuntimeError, match="size mismatch"):
        fast.decoder.layers[0].ffn.fc1.load_state_dict({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)})


@needs_avx512_bf16
def test_vnni_linear_is_inference_only():
    fast = gemv.Bf16VnniLinear(nn.Linear(32, 8).bfloat16())
    with pytest.raises(RuntimeError, match="inference-only"):
        fast(torch.randn(1, 32).bfloat16().requires_grad_())
    with pytest.raises(TypeError, match="bf16 weights but got torch.float32"):
        with torch.no_grad():
            fast(torch.randn(1, 32))
