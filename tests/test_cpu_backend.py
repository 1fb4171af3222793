"""The CPU backend as a whole (kosmos2/cpu/): its one entry point picks the measured fastest path, the prepared model
computes what the plain model computes (a matrix over backend x dtype x cache), the attention is chosen by name, the
model files import nothing from the backend, and the kernels' global off switch and build failures behave."""
import copy
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils import cpp_extension

import kosmos2.cpu  # noqa: F401  (registers the "cpu" attention)
from kosmos2 import build_model
from kosmos2.cpu import CpuPath, extension, prepare_for_cpu_inference
from kosmos2.cpu.fused_decode import FusedDecoderLayer
from kosmos2.model.attention import get_attention, registered_attention, sdpa_attention

from helpers import expected_cpu_path, small_config

REPO = Path(__file__).resolve().parents[1]


# ---- the entry point


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepare_takes_the_measured_best_path(dtype, trainable):
    model = build_model(small_config(), dtype=dtype).eval()
    path = prepare_for_cpu_inference(model, trainable=trainable)
    assert path.linears == expected_cpu_path(dtype, trainable)
    assert path.attention == model.attention == ("cpu" if extension.available() else "sdpa")
    fused = path.linears == "bf16-vnni"
    assert path.fused_decode_layers == (model.cfg.decoder_layers if fused else 0)
    assert all((type(layer) is FusedDecoderLayer) == fused for layer in model.decoder.layers)
    if trainable:  # every parameter is still an autograd leaf that gets a gradient
        model.train()
        model(torch.tensor([[0, 7, 8, 9]])).float().sum().backward()
        assert model.decoder.layers[0].ffn.fc1.weight.grad is not None


def test_prepare_leaves_models_on_other_devices_alone():
    model = build_model(small_config(), device="meta")
    assert prepare_for_cpu_inference(model) == CpuPath("plain", "sdpa", 0)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


# ---- backend x dtype x cache: every prepared model computes the plain model's logits


def left_padded_batch(cfg):
    """Two rows with an image each, the first left-padded by 2: (tokens, slot mask, real-token mask, pixels)."""
    q, pad = cfg.latent_query_num, cfg.pad_token_id
    g = torch.Generator().manual_seed(5)
    rows = []
    for n_pad, n_text in ((2, 6), (0, 8)):
        text = torch.randint(6, cfg.vocab_size, (n_text,), generator=g).tolist()
        rows.append([pad] * n_pad + [0, 3, *range(4, 4 + q), 5] + text)
    tokens = torch.tensor(rows)
    slots = torch.zeros_like(tokens, dtype=torch.bool)
    slots[0, 4:4 + q] = slots[1, 2:2 + q] = True
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
    return tokens, slots, tokens.ne(pad), pixels


@torch.no_grad()
def logits_of(model, tokens, slots, pixels, cache: str) -> torch.Tensor:
    """Logits of every position: one full forward, or a prefill of the image block and one KV-cached step per token."""
    pixels = pixels.to(next(model.parameters()).dtype)
    if cache == "none":
        return model(tokens, img_src_tokens=pixels, img_gpt_input_mask=slots).float()
    prefill = model.cfg.latent_query_num + 6
    kv = model.new_cache(tokens.shape[0], prefill + 2)  # small: the cache grows on the way
    out = [model(tokens[:, :prefill], img_src_tokens=pixels, img_gpt_input_mask=slots[:, :prefill], cache=kv)]
    out += [model(tokens[:, t:t + 1], cache=kv) for t in range(prefill, tokens.shape[1])]
    return torch.cat(out, dim=1).float()


@pytest.fixture(scope="module")
def plain_models():
    torch.manual_seed(0)
    model = build_model(small_config()).eval()
    with torch.no_grad():  # non-trivial layer norms and confident logits
        for name, p in model.named_parameters():
            if "ln" in name or "layer_norm" in name or "layernorm" in name:
                p.add_(0.2 * torch.randn_like(p))
        model.decoder.embed_tokens.weight.mul_(3.0)
    return {torch.float32: model, torch.bfloat16: copy.deepcopy(model).to(torch.bfloat16)}


@pytest.mark.parametrize("cache", ["none", "kv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["plain", "cpu", "cpu-trainable"])
def test_logits_equal_the_plain_path(plain_models, backend, dtype, cache):
    """Reference: the plain model of the same dtype, one full forward. fp32 differs by summation order only; bf16 by
    its rounding (the plain KV path, too, attends in fp32 over an fp32 cache)."""
    plain = plain_models[dtype]
    tokens, slots, real, pixels = left_padded_batch(plain.cfg)
    reference = logits_of(plain, tokens, slots, pixels, "none")
    model = copy.deepcopy(plain)
    if backend != "plain":
        path = prepare_for_cpu_inference(model, trainable=backend == "cpu-trainable")
        assert path.linears == expected_cpu_path(dtype, trainable=backend == "cpu-trainable")
    got = logits_of(model, tokens, slots, pixels, cache)
    assert got.shape == reference.shape
    scale = reference[real].abs().max().item()
    tolerance = 1e-4 if dtype == torch.float32 else 0.03
    assert (got[real] - reference[real]).abs().max().item() <= tolerance * scale
    if dtype == torch.float32:  # and the same greedy choices (bf16 may flip near-ties)
        assert torch.equal(got[real].argmax(-1), reference[real].argmax(-1))


# ---- attention by name


def test_attention_registry():
    assert {"sdpa", "cpu"} <= set(registered_attention())
    assert get_attention("sdpa") is sdpa_attention
    with pytest.raises(ValueError, match="unknown attention 'flash'.*registered are"):
        get_attention("flash")
    model = build_model(small_config())
    assert model.attention == "sdpa" and model.decoder.layers[0].self_attn.attend is sdpa_attention
    with pytest.raises(ValueError, match="unknown attention"):
        model.set_attention("flash")


@pytest.mark.skipif(not extension.available(), reason=f"CPU kernels unavailable: {extension.unavailable_reason()}")
def test_set_attention_reaches_every_attention_layer():
    model = build_model(small_config(), attention="cpu")
    cpu = get_attention("cpu")
    layers = [m for m in model.modules() if hasattr(m, "attend")]
    assert len(layers) == model.cfg.decoder_layers + 1  # the decoder's self-attention and the connector's
    assert all(m.attend is cpu for m in layers) and model.attention == "cpu"


def test_the_model_files_import_nothing_from_the_backend():
    """kosmos2/model/ is plain PyTorch; the backend swaps modules and registers its attention from outside."""
    for path in (REPO / "kosmos2" / "model").glob("*.py"):
        source = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+(kosmos2\.cpu|\.\.cpu|\.\. import cpu)", source, re.M), path
        assert "KOSMOS2_" not in source, f"{path} reads an environment switch"


# ---- the kernels: built wherever they can be, switched off globally, a failed build says why once


def test_kernels_compile_wherever_they_can():
    """The kernel tests skip where the extension is unavailable; a compile error must not pass for that. With a C++
    compiler, an AVX2/AVX512 CPU and the kernels not switched off, the extension has to build and load."""
    capable = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    if not (capable and shutil.which(os.environ.get("CXX", "c++")) and not extension.SWITCHED_OFF):
        pytest.skip("no C++ compiler, no AVX2, or KOSMOS2_CPU_KERNELS=0: the PyTorch paths are used")
    assert extension.available(), extension.unavailable_reason()


def test_each_checkout_builds_the_kernels_in_a_folder_of_its_own(tmp_path, monkeypatch):
    """torch's default build folder is one per extension name and its build file holds absolute source paths: two
    checkouts sharing it rebuilt each other's extension every time. The folder is keyed by the source folder and the
    Python, under $TORCH_EXTENSIONS_DIR when set."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = extension.build_directory()
    assert here.parent == tmp_path and here.name.startswith(extension.NAME + "-")
    assert extension.build_directory() == here  # the same checkout and Python: the same folder, built once
    clone = tmp_path / "clone" / "kosmos2" / "cpu" / "csrc"
    assert extension.build_directory(csrc=clone) != here
    assert extension.build_directory(python="/elsewhere/.venv/bin/python") != here
    assert extension.build_directory(csrc=clone) == extension.build_directory(csrc=clone)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert extension.build_directory().parent.parent == Path(cpp_extension.get_default_build_root())


def test_the_switch_turns_every_kernel_off_and_is_read_once():
    script = textwrap.dedent("""
        import os, torch
        import kosmos2.cpu
        from kosmos2 import build_model
        from kosmos2.cpu import extension, prepare_for_cpu_inference
        from helpers import expected_cpu_path, small_config
        os.environ["KOSMOS2_CPU_KERNELS"] = "1"  # too late: read once, at import
        assert not extension.available() and "KOSMOS2_CPU_KERNELS=0" in extension.unavailable_reason()
        model = build_model(small_config(), dtype=torch.bfloat16)
        path = prepare_for_cpu_inference(model)
        assert path.linears == expected_cpu_path(torch.bfloat16) and path.linears not in ("bf16-vnni", "bf16-cpu")
        assert path.attention == "sdpa" and path.fused_decode_layers == 0
        try:
            model.set_attention("cpu")
        except RuntimeError as err:
            print(err)
    """)
    env = {**os.environ, "KOSMOS2_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO / "tests", env=env)
    assert out.returncode == 0, out.stderr
    assert "attention 'cpu' cannot run here: switched off by KOSMOS2_CPU_KERNELS=0" in out.stdout


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    def no_compiler():
        raise RuntimeError("Error building extension 'kosmos2_cpu_kernels'\nc++: command not found")

    monkeypatch.setattr(extension, "_state", {})
    monkeypatch.setattr(extension, "SWITCHED_OFF", False)
    monkeypatch.setattr(extension, "_compile", no_compiler)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.warns(RuntimeWarning, match="compiling kosmos2_cpu_kernels .* failed: RuntimeError: c\\+\\+: command "
                                            "not found.*install a C\\+\\+ compiler"):
        assert not extension.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert not extension.available() and not extension.has_avx512_bf16()
    model = build_model(small_config(), dtype=torch.bfloat16)
    path = prepare_for_cpu_inference(model)
    assert path.attention == "sdpa" and path.linears in ("onednn-packed", "plain")
    with pytest.raises(RuntimeError, match="unavailable: compiling"):
        extension.kernels()


def test_kernels_build_with_the_environments_own_ninja(monkeypatch, tmp_path):
    """Whatever PATH says, the build runs this Python's ninja (pip's, next to it) first: `.venv/bin/python` without an
    activated environment would otherwise use the system's ninja, whose build log another ninja version cannot read,
    and each rebuilt the extension from scratch."""
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "ninja").write_text("")
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    from torch.utils import cpp_extension

    seen = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.append(os.environ["PATH"]) or "module")
    assert extension._compile() == "module"
    assert seen == [f"{bindir}{os.pathsep}/usr/bin:/bin"] and os.environ["PATH"] == "/usr/bin:/bin"
    (bindir / "ninja").unlink()  # no ninja of its own: PATH is left as it is
    extension._compile()
    assert seen[-1] == "/usr/bin:/bin"
