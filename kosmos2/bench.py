"""Benchmarks: our Kosmos-2 against transformers' `Kosmos2ForConditionalGeneration`, and against the machine.

    python -m kosmos2.bench generate --preset xl --dtype bf16 [--batch-size B] [--new-tokens N] [--compare-transformers]
    python -m kosmos2.bench generate --checkpoint FOLDER --dtype bf16 [--compare-transformers]
    python -m kosmos2.bench random-folder --preset xl --dtype bf16 --out FOLDER   # random weights written by transformers
    python -m kosmos2.bench train --preset tiny [--batch-size B] [--seq-len L] [--attention cpu] [--compare-transformers]
    python -m kosmos2.bench machine
    python -m kosmos2.bench memory --preset xl --gpus 8 --zero 2 [--offload] [--gpu-memory 40GB]   (kosmos2/memory_plan.py)

Each prints ONE JSON line. Weights are random (no downloads) unless `--checkpoint` names a folder; both implementations
load the same weights from one Hugging Face folder. Ours is loaded and prepared exactly as `kosmos2.api.Kosmos2` does
it (`checkpoint.load_model`, then `api.prepare_model`: on CPU the packed weights and kernels of `kosmos2.cpu`), so the
figures are those of the CLI, the demo and the evaluations. CPU time is shared with other jobs on small machines, so
every comparison interleaves the two implementations in one process (A, B, A, B, ...), repeats, reports medians and
records `os.getloadavg()`.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from contextlib import contextmanager

import torch
import torch.nn as nn

from .config import Kosmos2Config, load_preset
from .sequence_layout import image_text_layout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense peak FLOP/s per GPU (no sparsity), for MFU. Keyed by a substring of torch.cuda.get_device_name().
GPU_PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM; PCIe is ~756e12
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
    "V100": {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12},
    "T4": {"bf16": 0.0, "fp16": 65e12, "fp32": 8.1e12},
}


# ----------------------------------------------------------------------------------------------------------------
# environment


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    env = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values) -> float:
    return float(statistics.median(values))


# ----------------------------------------------------------------------------------------------------------------
# random-weight models


@torch.no_grad()
def cheap_init_(model: nn.Module, std: float = 0.02) -> None:
    """Random weights fast enough for the 1.66B-parameter xl preset (the official init is needlessly slow here):
    N(0, std) matrices, zero biases, unit LayerNorm gains. The embedding uses N(0, d^-0.5) like the official init,
    so that logits after the tied head are spread out and greedy choices are not decided by rounding noise."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, module.embedding_dim ** -0.5)
    for name, p in model.named_parameters(recurse=True):
        if name.endswith(("class_embedding", "positional_embedding", "latent_query")):
            p.normal_(0.0, std)


def build_random_model(cfg: Kosmos2Config, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Our model with random weights, built on the meta device and materialised once in the target dtype."""
    from .model.kosmos2 import Kosmos2Model

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Kosmos2Model(cfg, init_from_scratch=False)
    model = model.to(dtype).to_empty(device=device)
    model.decoder.rebuild_after_meta_init()
    cheap_init_(model)
    return model.eval()


def save_hf_copy(model: nn.Module, cfg: Kosmos2Config) -> tempfile.TemporaryDirectory:
    """Our weights as a Hugging Face folder (checkpoint.save_hf); the caller keeps the handle until loaded."""
    from .checkpoint import save_hf

    folder = tempfile.TemporaryDirectory(prefix="kosmos2-bench-")
    save_hf(model, cfg, folder.name)
    return folder


def load_transformers(folder: str, dtype: torch.dtype, device: torch.device):
    """transformers' Kosmos2ForConditionalGeneration from a save_hf folder, in `dtype`, with SDPA attention."""
    import transformers

    theirs = transformers.Kosmos2ForConditionalGeneration.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    return theirs.to(device).eval()


def tag_ids(vocab_size: int) -> dict:
    """Ids of the tags used by the benchmark prompts (docs/official_behaviour.md#vocabulary): the official dictionary
    ends with the 12 tags followed by 1024 location tokens, so counting back from the end finds them in any vocabulary
    built the same way (the tiny preset's included)."""
    return {"boi": vocab_size - 1034, "eoi": vocab_size - 1033, "grounding": vocab_size - 1025}


def grounding_prompt(cfg: Kosmos2Config) -> tuple[list[int], list[bool]]:
    """`<grounding>An image of` after one image: [<s>, <image>, slot ids 4.., </image>, <grounding>, text]
    (docs/official_behaviour.md#prompt-layout). The xl vocabulary gives the real ids of ▁An ▁image ▁of (712, 1648, 9);
    other vocabularies get 3 ordinary ids."""
    tags = tag_ids(cfg.vocab_size)
    text = [712, 1648, 9] if cfg.vocab_size == 65037 else [100, 200, 9]
    return image_text_layout(0, tags["boi"], tags["eoi"], cfg.latent_query_num, [[tags["grounding"], *text]])


class PeakRSS:
    """Samples this process's resident memory in a background thread: the peak *during* a block (ru_maxrss only
    ever grows, so it cannot tell the phases of one process apart)."""

    def __init__(self, interval_s: float = 0.005):
        import threading

        self.interval_s, self.peak_mb = interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.peak_mb = current_rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())


# ----------------------------------------------------------------------------------------------------------------
# machine limits


def _time_median(fn, repeats: int, device: torch.device) -> float:
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return median(times)


def memory_bandwidth(device: torch.device, mb: int = 512, repeats: int = 7) -> dict:
    """GB/s of a large copy (bytes read + written) and of a large reduction (bytes read): decoding streams the
    weights, so the read figure is the one the decode floor uses."""
    src = torch.ones(mb * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    copy_s = _time_median(lambda: dst.copy_(src), repeats, device)
    read_s = _time_median(lambda: src.sum(), repeats, device)
    return {"copy_gb_s": round(2 * nbytes / copy_s / 1e9, 2), "read_gb_s": round(nbytes / read_s / 1e9, 2)}


def matmul_throughput(device: torch.device, max_n: int = 4096, repeats: int = 5, budget_s: float = 1.0) -> dict:
    """GFLOP/s of a square matmul per dtype. The size doubles from 256 while the next product would still take under
    `budget_s`, up to `max_n`: a CPU without native bf16 (AVX2 only) runs bf16 ~100x slower than fp32, and a fixed
    2048^3 product would then take minutes. `matmul_{dtype}_n` records the size measured."""
    out = {}
    for name in ("fp32", "bf16"):
        n = 256
        while True:
            a = torch.randn(n, n, device=device).to(DTYPES[name])
            b = torch.randn(n, n, device=device).to(DTYPES[name])
            seconds = _time_median(lambda: a @ b, 1, device)
            if n >= max_n or 8 * seconds > budget_s:  # doubling n multiplies the work by 8
                break
            n *= 2
        seconds = min(seconds, _time_median(lambda: a @ b, repeats, device))
        out[f"matmul_{name}_gflop_s"] = round(2 * n ** 3 / seconds / 1e9, 1)
        out[f"matmul_{name}_n"] = n
    return out


def machine_limits(device: torch.device) -> dict:
    return {**memory_bandwidth(device), **matmul_throughput(device)}


def decode_bytes_per_step(model: nn.Module) -> int:
    """Bytes of weights one decoding step must read: every decoder parameter except the embedding table (one row
    is looked up), plus the output head, which reads the whole (tied) embedding matrix. The image tower and connector
    are not used after the prefill."""
    decoder = model.decoder
    head = decoder.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for name, p in decoder.named_parameters() if "embed_tokens" not in name)
    packed = [m for m in decoder.modules() if hasattr(m, "packed_weight")]
    total += sum(m.in_features * m.out_features * head.element_size() for m in packed)
    if not any(m is decoder.output_projection for m in packed):
        total += head.numel() * head.element_size()
    return total


# ----------------------------------------------------------------------------------------------------------------
# generate


class StepClock:
    """Time stamps at the end of every forward call of a module (one prefill, then one call per decoding step)."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device, self.stamps = module, device, []

    def _hook(self, *args):
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def __enter__(self):
        self.stamps = []
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def step_timing(start: float, stamps: list[float], batch: int) -> dict:
    """prefill = start -> end of the first forward (image encoding included); decode = the remaining forwards, each
    producing one token per row."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"prefill_s": stamps[0] - start, "decode_s": stamps[-1] - stamps[0], "steps": steps,
            "decode_tok_s": batch * len(steps) / (stamps[-1] - stamps[0]) if steps else float("nan")}


def run_ours(model, pixels, ids, mask, new_tokens: int, device) -> tuple[dict, list[list[int]]]:
    """Our library's path: encode the images, then kosmos2.decoding.generate (greedy, KV cache)."""
    from .decoding import generate

    batch = pixels.shape[0]
    with torch.no_grad(), StepClock(model, device) as clock:
        start = time.perf_counter()
        features = model.encode_images(pixels)
        results = generate(model, [ids] * batch, [mask] * batch, features, semantics="hf",
                           max_new_tokens=new_tokens, no_repeat_ngram_size=0)
    return step_timing(start, clock.stamps, batch), [r.tokens for r in results]


def run_transformers(theirs, pixels, ids, mask, new_tokens: int, device, eos: int = 2):
    """transformers' generate with the same semantics: greedy, use_cache, no n-gram blocking, stop at </s>."""
    batch = pixels.shape[0]
    input_ids = torch.tensor([ids] * batch, device=device)
    with torch.no_grad(), StepClock(theirs.text_model, device) as clock:
        start = time.perf_counter()
        out = theirs.generate(pixel_values=pixels, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              image_embeds_position_mask=torch.tensor([mask] * batch, device=device).long(),
                              max_new_tokens=new_tokens, do_sample=False, num_beams=1, no_repeat_ngram_size=0,
                              use_cache=True, eos_token_id=eos, pad_token_id=1)
    tokens = []
    for row in out[:, len(ids):].tolist():
        tokens.append(row[:row.index(eos)] if eos in row else row)
    return step_timing(start, clock.stamps, batch), tokens


def first_divergence(a: list[list[int]], b: list[list[int]]) -> int | None:
    """The first generation step at which some row differs (None if all rows are equal)."""
    steps = []
    for x, y in zip(a, b):
        if x != y:
            steps.append(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))))
    return min(steps) if steps else None


def divergence_margin(theirs, pixels, ids, mask, ours: list[list[int]], reference: list[list[int]], step: int) -> dict:
    """Where greedy tokens first differ: how much transformers' own logits preferred its token over ours at that step
    (teacher-forced on the common prefix), in logit units and in bf16 ulps at that magnitude. With random weights,
    near-ties of the top two logits happen, and then any change of summation order (a different but equally exact
    kernel) picks the other token: a margin of 0-2 ulps is such a tie, a large margin a real difference."""
    row = next(r for r, (a, b) in enumerate(zip(ours, reference)) if a[:step + 1] != b[:step + 1])
    prefix = ids + reference[row][:step]
    device = pixels.device
    with torch.no_grad():
        logits = theirs(pixel_values=pixels[row:row + 1], input_ids=torch.tensor([prefix], device=device),
                        image_embeds_position_mask=torch.tensor([mask + [0] * step], device=device).long()).logits
    last = logits[0, -1].float()
    theirs_token = reference[row][step] if step < len(reference[row]) else 2
    ours_token = ours[row][step] if step < len(ours[row]) else 2
    margin = float(last[theirs_token] - last[ours_token])
    ulp = 2.0 ** (math.floor(math.log2(max(abs(float(last[theirs_token])), 1e-30))) - 7)  # bf16: 8 significant bits
    return {"divergence_margin": round(margin, 5), "divergence_margin_bf16_ulp": round(margin / ulp, 2)}


def summarise(runs: list[dict], peak_mb: float) -> dict:
    """Medians over the repeats; `decode_step_ms_median` pools the single steps of all repeats (robust to bursts of
    load from other processes)."""
    steps = [s for r in runs for s in r["steps"]]
    return {"prefill_s": round(median(r["prefill_s"] for r in runs), 4),
            "decode_tok_s": round(median(r["decode_tok_s"] for r in runs), 3),
            "decode_step_ms_median": round(1e3 * median(steps), 2) if steps else None,
            "peak_rss_mb": round(peak_mb, 1)}


class MemoryLedger:
    """Peak resident memory of each implementation as if it ran alone in this process: RSS before any model + what
    its weights occupy once warmed up (transformers may map the weight file lazily, so loading alone can show
    little) + the peak growth during one lone run. Both models share one process, so the plain process peak would
    count the other model too."""

    def __init__(self):
        gc.collect()
        self.base_mb = current_rss_mb()
        self.entries = {}

    @contextmanager
    def loading(self, name: str):
        """Around building/loading the model *and* its warm-up run."""
        gc.collect()
        before = current_rss_mb()
        yield
        gc.collect()
        self.entries[name] = {"resident_mb": current_rss_mb() - before}

    @contextmanager
    def running(self, name: str):
        gc.collect()
        before = current_rss_mb()
        with PeakRSS() as peak:
            yield
        self.entries[name]["run_mb"] = peak.peak_mb - before

    def peak_mb(self, name: str) -> float:
        e = self.entries[name]
        return round(self.base_mb + e["resident_mb"] + e["run_mb"], 1)


def interleaved(runners: dict, repeats: int) -> dict:
    """Run every implementation `repeats` times in turn (A, B, A, B, ...), so that load from other jobs on the
    machine hits both alike; returns the list of results of each."""
    out = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            out[name].append(run())
    return out


def bench_generate(args) -> dict:
    from .api import prepare_model
    from .checkpoint import load_model

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    folder = args.checkpoint or random_folder(load_preset(args.preset), dtype, args.seed)
    memory = MemoryLedger()
    with memory.loading("ours"):
        ours = load_model(getattr(folder, "name", folder), device=device, dtype=dtype).eval()
        cpu_path = prepare_model(ours)  # what kosmos2.api.Kosmos2 does to every model it holds
        cfg = ours.cfg
        ids, mask = grounding_prompt(cfg)
        pixels = torch.randn(args.batch_size, 3, cfg.image_size, cfg.image_size).to(device, dtype)
        warm = min(4, args.new_tokens)
        run_ours(ours, pixels, ids, mask, warm, device)  # warm-up: oneDNN primitives, allocator
    with memory.running("ours"):
        run_ours(ours, pixels, ids, mask, args.new_tokens, device)
    runners = {"ours": lambda: run_ours(ours, pixels, ids, mask, args.new_tokens, device)}
    if args.compare_transformers:
        with memory.loading("transformers"):
            theirs = load_transformers(getattr(folder, "name", folder), dtype, device)
            run_transformers(theirs, pixels, ids, mask, warm, device)
        with memory.running("transformers"):
            run_transformers(theirs, pixels, ids, mask, args.new_tokens, device)
        runners["transformers"] = lambda: run_transformers(theirs, pixels, ids, mask, args.new_tokens, device)
    if hasattr(folder, "cleanup"):
        folder.cleanup()

    limits = memory_bandwidth(device)
    runs = interleaved(runners, args.repeats)
    ours_tokens = runs["ours"][-1][1]
    result = {"bench": "generate", "preset": args.checkpoint or args.preset, "dtype": args.dtype,
              "batch_size": args.batch_size, "new_tokens": args.new_tokens, "prompt_tokens": len(ids),
              "repeats": args.repeats, "generated_tokens": sum(len(t) for t in ours_tokens),
              "linear_path": cpu_path.linears, "attention": cpu_path.attention,
              "fused_decode_layers": cpu_path.fused_decode_layers}
    result.update(summarise([r[0] for r in runs["ours"]], memory.peak_mb("ours")))
    result.update(decode_floor(ours, limits, args.batch_size, result["decode_step_ms_median"]))
    if "transformers" in runs:
        hf = summarise([r[0] for r in runs["transformers"]], memory.peak_mb("transformers"))
        theirs_tokens = runs["transformers"][-1][1]
        result["transformers"] = hf
        result.update(
            decode_speedup=round(result["decode_tok_s"] / hf["decode_tok_s"], 3),
            decode_step_speedup=round(hf["decode_step_ms_median"] / result["decode_step_ms_median"], 3),
            prefill_ratio=round(result["prefill_s"] / hf["prefill_s"], 3),
            peak_rss_ratio=round(result["peak_rss_mb"] / hf["peak_rss_mb"], 3),
            tokens_equal=ours_tokens == theirs_tokens,
            first_divergence_step=first_divergence(ours_tokens, theirs_tokens))
        if result["first_divergence_step"] is not None:
            result.update(divergence_margin(theirs, pixels, ids, mask, ours_tokens, theirs_tokens,
                                            result["first_divergence_step"]))
    result["env"] = environment(device)
    return result


def random_folder(cfg: Kosmos2Config, dtype: torch.dtype, seed: int) -> tempfile.TemporaryDirectory:
    """A temporary Hugging Face folder with our random weights (`build_random_model`); the model itself is freed
    before anything is loaded from the folder."""
    from .cpu import release_freed_memory

    model = build_random_model(cfg, dtype, torch.device("cpu"), seed)
    folder = save_hf_copy(model, cfg)
    del model
    gc.collect()
    release_freed_memory()
    return folder


def bench_random_folder(args) -> dict:
    """Write an HF folder with random weights, by transformers' own initialisation (`--by transformers`: a folder
    no code of ours wrote) or by `build_random_model` (`--by ours`)."""
    cfg, dtype = load_preset(args.preset), DTYPES[args.dtype]
    start = time.perf_counter()
    if args.by == "ours":
        from .checkpoint import save_hf

        save_hf(build_random_model(cfg, dtype, torch.device("cpu"), args.seed), cfg, args.out)
    else:
        import transformers

        from .checkpoint import config_to_hf

        torch.manual_seed(args.seed)
        config = transformers.Kosmos2Config.from_dict(config_to_hf(cfg, dtype))
        model = transformers.Kosmos2ForConditionalGeneration._from_config(config, dtype=dtype)
        model.save_pretrained(args.out)
    return {"bench": "random-folder", "preset": args.preset, "dtype": args.dtype, "by": args.by, "out": args.out,
            "seconds": round(time.perf_counter() - start, 1)}


def decode_floor(model: nn.Module, limits: dict, batch: int, step_ms: float | None) -> dict:
    """The memory-bandwidth floor of one decoding step: weights read per step / measured read bandwidth."""
    nbytes = decode_bytes_per_step(model)
    floor_ms = nbytes / (limits["read_gb_s"] * 1e9) * 1e3
    return {"weights_read_per_step_mb": round(nbytes / 2**20, 1), **limits,
            "decode_floor_ms_per_step": round(floor_ms, 2), "decode_floor_tok_s": round(batch * 1e3 / floor_ms, 2),
            "decode_step_over_floor": round(step_ms / floor_ms, 3) if step_ms else None}


# ----------------------------------------------------------------------------------------------------------------
# train


def training_batch(cfg: Kosmos2Config, batch: int, seq_len: int, device, dtype, seed: int):
    """A GRIT-like sequence per row: [<s>, <image>, slots holding the <image> id
    (docs/official_behaviour.md#training-sequence), </image>, random text], `seq_len` tokens in all, plus one random
    image per row. Returns (ids, image-slot mask, pixels, loss mask): the loss mask marks the positions whose next token
    is learned, i.e. from `</image>` to the second-last position (docs/official_behaviour.md#training-sequence: the
    caption tokens, nothing for <s>, <image>, the slots or `</image>`)."""
    g = torch.Generator().manual_seed(seed)
    tags = tag_ids(cfg.vocab_size)
    head, head_mask = image_text_layout(0, tags["boi"], tags["eoi"], cfg.latent_query_num, [[]], slot_id=tags["boi"])
    if seq_len <= len(head):
        raise ValueError(f"--seq-len must exceed the {len(head)} tokens of the image block")
    text = torch.randint(4, tags["boi"] - 1, (batch, seq_len - len(head)), generator=g)
    ids = torch.cat([torch.tensor(head).expand(batch, -1), text], dim=1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, :len(head)] = torch.tensor(head_mask)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, len(head) - 1:-1] = True
    pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    return ids.to(device), mask.to(device), pixels.to(device, dtype), loss_mask.to(device)


def adamw(params, lr: float) -> torch.optim.Optimizer:
    """The same optimizer for both implementations: PyTorch's fused AdamW (one kernel for all parameters, on CPU
    and CUDA), which is transformers' Trainer default with torch >= 2.8 and what our `--optimizer torch_adamw` uses;
    the multi-tensor version where a device has no fused kernel."""
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, foreach=True)


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    mode = "fused" if optimizer.defaults.get("fused") else "foreach" if optimizer.defaults.get("foreach") else "for-loop"
    return f"{type(optimizer).__name__} ({mode})"


class Trainer:
    """One implementation's forward + loss + backward + AdamW step on a fixed batch. `loss_fn` runs the forward and
    returns the loss the way that implementation trains."""

    def __init__(self, model: nn.Module, loss_fn, lr: float = 1e-4):
        self.model, self.loss_fn = model.train(), loss_fn
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adamw(self.params, lr)
        self.losses: list[float] = []

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.item())
        return self.losses[-1]

    def timed_steps(self, n: int, device) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.step()
            synchronize(device)
            times.append(time.perf_counter() - start)
        return times


def ours_trainer(model, ids, mask, pixels, loss_mask) -> Trainer:
    """Our training path (fairseq_plugins/criterion.py): logits only where the loss needs them, fp32 cross-entropy."""
    targets = ids[:, 1:][loss_mask[:, :-1]]

    def loss_fn():
        logits = model(ids, img_src_tokens=pixels, img_gpt_input_mask=mask, logits_mask=loss_mask)
        return nn.functional.cross_entropy(logits.float(), targets)

    return Trainer(model, loss_fn)


def transformers_trainer(theirs, ids, mask, pixels, loss_mask) -> Trainer:
    """transformers' training path: `labels` with -100 where nothing is learned (the model shifts them itself and
    returns the mean cross-entropy). The same trainable set as ours: the vision tower frozen (the official recipe)."""
    for p in theirs.vision_model.parameters():
        p.requires_grad_(False)
    attention = torch.ones_like(ids)
    learned = torch.zeros_like(loss_mask)
    learned[:, 1:] = loss_mask[:, :-1]  # label t is predicted at position t - 1
    labels = ids.masked_fill(~learned, -100)
    return Trainer(theirs, lambda: theirs(input_ids=ids, pixel_values=pixels, attention_mask=attention,
                                          image_embeds_position_mask=mask.long(), labels=labels, use_cache=False).loss)


def gpu_peak_flops(device: torch.device, dtype_name: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in GPU_PEAK_FLOPS.items():
        if key in name:
            return table.get(dtype_name) or None
    return None


def train_summary(trainer: Trainer, times: list[float], tokens: int, peak_mb: float, device, dtype_name) -> dict:
    step_s = median(times)
    out = {"step_s": round(step_s, 4), "tokens_s": round(tokens / step_s, 1), "peak_rss_mb": round(peak_mb, 1),
           "trainable_params": sum(p.numel() for p in trainer.params)}
    peak = gpu_peak_flops(device, dtype_name)
    if peak:  # MFU with the usual 6 N per token (forward + backward of the trained weights)
        out["mfu"] = round(6 * out["trainable_params"] * out["tokens_s"] / peak, 4)
    if device.type == "cuda":
        out["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def bench_train(args) -> dict:
    from . import cpu  # noqa: F401  (registers the "cpu" attention)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = load_preset(args.preset)
    ids, mask, pixels, loss_mask = training_batch(cfg, args.batch_size, args.seq_len, device, dtype, args.seed)
    memory = MemoryLedger()
    with memory.loading("ours"):
        ours = build_random_model(cfg, dtype, device, args.seed)
        ours.set_attention(args.attention)  # what --attention does in fairseq_plugins/model.py
        folder = save_hf_copy(ours, cfg) if args.compare_transformers else None
        trainers = {"ours": ours_trainer(ours, ids, mask, pixels, loss_mask)}
        trainers["ours"].timed_steps(1, device)  # warm-up; allocates the optimizer state
    with memory.running("ours"):
        trainers["ours"].timed_steps(1, device)
    if folder is not None:
        with memory.loading("transformers"):
            theirs = load_transformers(folder.name, dtype, device)
            trainers["transformers"] = transformers_trainer(theirs, ids, mask, pixels, loss_mask)
            trainers["transformers"].timed_steps(1, device)
        folder.cleanup()
        with memory.running("transformers"):
            trainers["transformers"].timed_steps(1, device)
    runs = interleaved({name: (lambda t=t: t.timed_steps(args.steps, device)) for name, t in trainers.items()},
                       args.repeats)
    tokens = ids.numel()
    result = {"bench": "train", "preset": args.preset, "dtype": args.dtype, "attention": args.attention,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "repeats": args.repeats,
              "loss": "cross-entropy of the caption tokens (docs/official_behaviour.md#training-sequence), "
                      "each implementation's own training path",
              "learned_tokens": int(loss_mask.sum()), "optimizer": optimizer_name(trainers["ours"].optimizer)}
    result.update(train_summary(trainers["ours"], sum(runs["ours"], []), tokens, memory.peak_mb("ours"),
                                device, args.dtype))
    if "transformers" in runs:
        hf = train_summary(trainers["transformers"], sum(runs["transformers"], []), tokens,
                           memory.peak_mb("transformers"), device, args.dtype)
        result["transformers"] = hf
        result["tokens_s_speedup"] = round(result["tokens_s"] / hf["tokens_s"], 3)
        result["same_trainable_params"] = result["trainable_params"] == hf["trainable_params"]
        # the first step of each starts from the same weights: the losses must agree (else the comparison is void)
        first = trainers["ours"].losses[0], trainers["transformers"].losses[0]
        result["first_loss"], hf["first_loss"] = round(first[0], 6), round(first[1], 6)
        result["same_first_loss"] = math.isclose(*first, rel_tol=1e-4 if dtype == torch.float32 else 2e-2)
    result["env"] = environment(device)
    return result


# ----------------------------------------------------------------------------------------------------------------
# machine


def bench_machine(args) -> dict:
    device = torch.device(args.device)
    return {"bench": "machine", **machine_limits(device), "env": environment(device)}


# ----------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser = argparse.ArgumentParser(prog="python -m kosmos2.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default=default_device)
    common.add_argument("--seed", type=int, default=0)
    gen = sub.add_parser("generate", parents=[common], help="prefill time and greedy decoding speed")
    gen.add_argument("--preset", default="tiny", help="random weights of this preset (a name or a .json path)")
    gen.add_argument("--checkpoint", help="measure these weights instead (any checkpoint kosmos2 loads; an HF folder "
                                          "for --compare-transformers, e.g. one written by `random-folder`)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    gen.add_argument("--batch-size", type=int, default=1)
    gen.add_argument("--new-tokens", type=int, default=32)
    gen.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    gen.add_argument("--compare-transformers", action="store_true")
    train = sub.add_parser("train", parents=[common], help="forward + backward + AdamW step throughput")
    train.add_argument("--preset", default="tiny")
    train.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    train.add_argument("--repeats", type=int, default=3)
    train.add_argument("--attention", choices=["sdpa", "cpu"], default="sdpa",
                       help="our attention implementation, as training's --attention (cpu: the fp32 CPU kernel)")
    train.add_argument("--compare-transformers", action="store_true")
    sub.add_parser("machine", parents=[common], help="memory bandwidth and matmul throughput")
    add_memory_parser(sub)
    rand = sub.add_parser("random-folder", parents=[common], help="write an HF folder with random weights")
    rand.add_argument("--preset", default="tiny")
    rand.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    rand.add_argument("--out", required=True)
    rand.add_argument("--by", choices=["transformers", "ours"], default="transformers",
                      help="whose initialisation writes the weights (default: transformers')")
    args = parser.parse_args(argv)
    if getattr(args, "compare_transformers", False) or getattr(args, "by", None) == "transformers":
        try:
            import transformers  # noqa: F401
        except ImportError:
            parser.error("--compare-transformers and random-folder --by transformers need the transformers package "
                         "(pip install transformers)")
    return args


def add_memory_parser(sub) -> None:
    memory = sub.add_parser("memory", help="training memory per GPU (kosmos2/memory_plan.py); prints a table, then JSON")
    memory.add_argument("--preset", default="xl")
    memory.add_argument("--gpus", type=int, default=1, help="GPUs in all (data-parallel ranks)")
    memory.add_argument("--gpus-per-node", type=int, default=None, help="for the host memory of --offload")
    memory.add_argument("--zero", type=int, choices=(1, 2, 3), default=0, help="DeepSpeed ZeRO stage (default: DDP)")
    memory.add_argument("--offload", action="store_true", help="ZeRO-Offload: optimizer state and step on the CPU")
    memory.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    memory.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    memory.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    memory.add_argument("--learned", type=int, default=None, help="loss tokens per sequence (default: --seq)")
    memory.add_argument("--images", type=int, default=None, help="images per micro-batch (default: --batch)")
    memory.add_argument("--checkpoint-activations", action="store_true")
    memory.add_argument("--no-freeze-all", action="store_true", help="train the ViT too")
    memory.add_argument("--gpu-memory", default=None, help="card size, e.g. 24GB: says whether the plan fits")


def bench_memory(args) -> dict:
    from .memory_plan import TrainSetup, parse_memory, plan, table

    setup = TrainSetup(preset=args.preset, gpus=args.gpus, gpus_per_node=args.gpus_per_node, zero=args.zero,
                       offload=args.offload, dtype=args.dtype, batch=args.batch, seq=args.seq, learned=args.learned,
                       images=args.images, checkpoint_activations=args.checkpoint_activations,
                       no_freeze_all=args.no_freeze_all,
                       gpu_memory=parse_memory(args.gpu_memory) if args.gpu_memory else None)
    result = {"bench": "memory", **plan(setup)}
    print(table(result))
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = {"generate": bench_generate, "train": bench_train, "machine": bench_machine, "memory": bench_memory,
           "random-folder": bench_random_folder}[args.command]
    result = run(args)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
