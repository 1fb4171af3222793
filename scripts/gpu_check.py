"""Check every GPU path of the project in one run and print one JSON report (scripts/gpu_check.sh runs this).

    bash scripts/gpu_check.sh [--quick] [--out report.json]

On a GPU, with the xl preset (random weights; the released vocabulary when KOSMOS2_ASSETS points at it):
  training    the official recipe (configs/train/xl_official.sh) through `python -m fairseq_plugins.train`, one GPU,
              full 2048-token sequences (the text stream), bf16 and fp16, fairseq's trainer and DeepSpeed ZeRO-2,
              with and without activation checkpointing: tokens/s, MFU, peak memory, and the memory planner's
              prediction for the same setup (kosmos2/memory_plan.py); the full check adds ZeRO-3 and ZeRO-2 with CPU
              offload. --quick: bf16 only, with activation checkpointing.
  attention   which kernel the decoder's attention runs (profiler kernel names): flash / memory-efficient / math
  generation  `kosmos2.bench generate --compare-transformers` in bf16, batch 1 and 32: same tokens?, tokens/s
  evaluation  evaluation.runner on 256 captioning prompts at batch 32 (quick: 64): images/s
Without a GPU the same functions run with the tiny preset on the CPU (fp32, small sizes: a check of the code paths,
not of speed), and the report's "gpu" entry says "not run: no GPU". Every check records its error instead of
stopping the others; the exit status is 1 if any failed. The report is the last line printed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch

# flags of configs/train/xl_official.sh that a check run replaces: (flag, number of values)
REPLACED = {"--visual-pretrained": 1, "--memory-efficient-fp16": 0, "--fp16-init-scale": 1, "--optimizer": 1,
            "--max-update": 1, "--total-num-update": 1, "--log-interval": 1, "--log-format": 1, "--save-dir": 1,
            "--tensorboard-logdir": 1, "--laion-data-dir": 1, "--data-weights": 1, "--dict-path": 1, "--spm-model": 1,
            "--arch": 1, "--warmup-updates": 1, "--visual-model-name": 1, "--visual-output-dim": 1,
            "--update-freq": 1, "--tokens-per-sample": 1, "--checkpoint-activations": 0, "--batch-read-ahead": 1,
            "--train-json-split-name": 1, "--interleaved-data-dir": 1}


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# setting


class Setting:
    """What the checks run on: xl on the GPU, or the tiny preset on the CPU."""

    def __init__(self, quick: bool, gpu: bool, work: Path):
        self.quick, self.gpu, self.work = quick, gpu, work
        self.preset = "xl" if gpu else "tiny"
        self.device = "cuda" if gpu else "cpu"
        self.seq = 2048 if gpu else 256
        self.updates = (8 if quick else 12) if gpu else 3
        self.data = ensure_corpus(work / "synthetic")
        # xl gets the released vocabulary when it is at hand; the CPU check keeps the corpus's small one (speed)
        self.tokenizer, self.released_vocabulary = tokenizer_dir(self.data) if gpu else (self.data / "tokenizer", False)


def ensure_corpus(data: Path) -> Path:
    if not (data / "text" / "json" / "train.json").is_file():
        log(f"building a small synthetic corpus in {data}")
        subprocess.run([sys.executable, str(REPO / "data/make_synthetic.py"), "--out", str(data), "--num-images", "64",
                        "--eval-images", "16", "--text-docs", "200", "--interleaved-docs", "4", "--quiet"], check=True)
    return data


def tokenizer_dir(data: Path) -> tuple[Path, bool]:
    """(folder with dict.txt + sentencepiece.bpe.model, whether it is the released vocabulary)."""
    assets = os.environ.get("KOSMOS2_ASSETS")
    if assets and (Path(assets) / "dict.txt").is_file():
        return Path(assets), True
    return data / "tokenizer", False


# ---------------------------------------------------------------------------------------------------------------------
# training


def recipe_flags() -> list[str]:
    out = subprocess.run(["bash", str(REPO / "configs/train/xl_official.sh")], capture_output=True, text=True, check=True)
    flags, kept, i = shlex.split(out.stdout), [], 0
    while i < len(flags):
        if flags[i] in REPLACED:
            i += 1 + REPLACED[flags[i]]
            continue
        kept.append(flags[i])
        i += 1
    return kept


def training_runs(setting: Setting) -> list[dict]:
    """(name, precision, zero, offload, activation checkpointing) of each run."""
    if not setting.gpu:  # CPU: fp32 (fairseq has no bf16 on CPU, DeepSpeed's CPU accelerator no fp16)
        return [dict(precision="fp32", zero=0, offload=False, ckpt=True), dict(precision="fp32", zero=2, offload=False, ckpt=True)]
    if setting.quick:
        return [dict(precision="bf16", zero=0, offload=False, ckpt=True), dict(precision="bf16", zero=2, offload=False, ckpt=True)]
    runs = [dict(precision=p, zero=z, offload=False, ckpt=c) for p in ("bf16", "fp16") for z in (0, 2) for c in (True, False)]
    return runs + [dict(precision="bf16", zero=3, offload=False, ckpt=True), dict(precision="bf16", zero=2, offload=True, ckpt=True)]


def train_flags(setting: Setting, run: dict, save_dir: Path) -> list[str]:
    precision = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16", "--fp16-init-scale", "4"]}[run["precision"]]
    flags = [*recipe_flags(), "--arch", f"unigptmodel_{setting.preset}", *precision, "--optimizer", "torch_adamw",
             "--data-weights", "0,0,1", "--tokens-per-sample", str(setting.seq), "--update-freq", "1",
             "--batch-read-ahead", "8", "--dict-path", str(setting.tokenizer / "dict.txt"),
             "--spm-model", str(setting.tokenizer / "sentencepiece.bpe.model"),
             "--max-update", str(setting.updates), "--total-num-update", str(setting.updates),
             "--warmup-updates", "1", "--log-format", "json", "--log-interval", "1", "--no-save",
             "--save-dir", str(save_dir), "--laion-data-dir", str(setting.data / "grit")]
    flags[0] = str(setting.data / "text")  # the recipe's first word is the text data dir
    if not setting.gpu:
        flags += ["--cpu", "--num-workers", "0"]
    if run["ckpt"]:
        flags.append("--checkpoint-activations")
    if run["zero"]:
        flags += ["--deepspeed", "--zero", str(run["zero"])] + (["--zero-offload"] if run["offload"] else [])
    return flags


def parse_training_log(text: str) -> dict:
    updates = [json.loads(line[line.index("{"):]) for line in text.splitlines()
               if "| train_inner |" in line and "{" in line]
    trained = re.search(r"num\. trained: ([\d,]+)", text)
    return {"updates": updates, "trainable_params": int(trained.group(1).replace(",", "")) if trained else None}


def check_training_run(setting: Setting, run: dict) -> dict:
    from kosmos2.bench import gpu_peak_flops
    from kosmos2.memory_plan import GIB, TrainSetup, plan

    name = f"{run['precision']} {'ZeRO-' + str(run['zero']) if run['zero'] else 'fairseq'}" + \
           (" + offload" if run["offload"] else "") + (" + ckpt" if run["ckpt"] else "")
    log(f"training: {name}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=setting.work) as save_dir:
        command = [sys.executable, "-m", "fairseq_plugins.train", *train_flags(setting, run, Path(save_dir))]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"training failed ({shlex.join(command)}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    parsed = parse_training_log(done.stdout)
    updates = parsed["updates"]
    if len(updates) != setting.updates:
        raise RuntimeError(f"expected {setting.updates} logged updates, got {len(updates)}")
    steady = updates[len(updates) // 2:]  # the first updates include allocator and kernel warm-up
    tokens_s = statistics.median(float(u["wps"]) for u in steady)
    result = {"run": name, "seconds": round(seconds, 1), "updates": len(updates), "seq": setting.seq,
              "tokens_s": round(tokens_s, 1), "trainable_params": parsed["trainable_params"],
              "loss_first": float(updates[0]["loss"]), "loss_last": float(updates[-1]["loss"])}
    if setting.gpu:
        peak = gpu_peak_flops(torch.device("cuda"), run["precision"])
        result["mfu"] = round(6 * parsed["trainable_params"] * tokens_s / peak, 4) if peak else None
        total = torch.cuda.get_device_properties(0).total_memory / GIB
        result["peak_gb"] = round(total - min(float(u["gb_free"]) for u in updates if "gb_free" in u), 2)
        planned = plan(TrainSetup(preset=setting.preset, zero=run["zero"], offload=run["offload"],
                                  dtype=run["precision"], seq=setting.seq, images=1,
                                  checkpoint_activations=run["ckpt"]))
        result["planner_gb"] = round(planned["allocated_peak"] / GIB, 2)
        result["planner_over_measured"] = round(result["planner_gb"] / result["peak_gb"], 3)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# attention kernel, generation, evaluation


def check_attention(setting: Setting) -> dict:
    """Forward + backward of one decoder attention block as training runs it; the kernels the profiler saw."""
    from torch.profiler import ProfilerActivity, profile

    from kosmos2.config import load_preset
    from kosmos2.cpu import extension  # importing kosmos2.cpu registers the "cpu" attention
    from kosmos2.model.attention import set_attention
    from kosmos2.model.decoder import SelfAttention

    cfg = load_preset(setting.preset)
    dtype = torch.bfloat16 if setting.gpu else torch.float32
    attention = SelfAttention(cfg).to(setting.device, dtype).train()
    # GPU training's attention is the default, SDPA; on CPU the embedded recipe trains with `--attention cpu` (SDPA
    # when the kernels are switched off or cannot be had, as configs/train/tiny_cpu.sh does)
    implementation = "cpu" if not setting.gpu and extension.available() else "sdpa"
    set_attention(attention, implementation)
    x = torch.randn(1, setting.seq, cfg.decoder_embed_dim, device=setting.device, dtype=dtype, requires_grad=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setting.gpu else [])
    with profile(activities=activities) as prof:
        attention(x, None, True).sum().backward()
        if setting.gpu:
            torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if re.search(r"flash|fmha|efficient|attention|sdp", e.name, re.I)})
    joined = " ".join(names).lower()
    if "flash" in joined and setting.gpu:
        kernel = "flash"
    elif re.search(r"fmha|efficient|cutlass", joined):
        kernel = "memory_efficient"
    elif "trainattention" in joined.replace("_", ""):  # kosmos2/cpu/attention.py (fp32 training on CPU)
        kernel = "kosmos2 CPU training kernel"
    elif "flash" in joined:
        kernel = "flash (CPU)"
    else:
        kernel = "math"
    return {"attention": implementation, "kernel": kernel, "dtype": str(dtype).replace("torch.", ""), "seq": setting.seq,
            "names": names[:12],
            "ok": kernel in ("flash", "memory_efficient") if setting.gpu else True}


def check_generation(setting: Setting) -> list[dict]:
    from kosmos2 import bench

    batches = (1, 32) if setting.gpu else (1, 4)
    out = []
    for batch in batches:
        log(f"generation: batch {batch} against transformers")
        argv = ["generate", "--preset", setting.preset, "--dtype", "bf16" if setting.gpu else "fp32",
                "--batch-size", str(batch), "--new-tokens", "32" if setting.gpu else "8", "--repeats",
                "2" if setting.quick else "3", "--device", setting.device, "--compare-transformers"]
        with contextlib.redirect_stdout(sys.stderr):  # bench prints its own JSON line; the report is ours
            result = bench.main(argv)
        out.append({"batch": batch, "tokens_equal": result.get("tokens_equal"),
                    "first_divergence_step": result.get("first_divergence_step"),
                    "decode_tok_s": result.get("decode_tok_s"),
                    "transformers_decode_tok_s": result.get("transformers", {}).get("decode_tok_s"),
                    "decode_speedup": result.get("decode_speedup"), "prefill_s": result.get("prefill_s")})
    return out


def check_evaluation(setting: Setting) -> dict:
    """evaluation.runner (what every wrapper runs) on captioning prompts with a random checkpoint of the preset."""
    from evaluation import runner
    from kosmos2.api import Kosmos2
    from kosmos2.bench import build_random_model
    from kosmos2.checkpoint import save_official
    from kosmos2.config import load_preset
    from kosmos2.tokenizer import Kosmos2Tokenizer

    prompts, batch = ((64 if setting.quick else 256), 32) if setting.gpu else (16, 8)
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-eval-", dir=setting.work))
    for name in ("sentencepiece.bpe.model", "dict.txt"):
        (folder / name).write_bytes((setting.tokenizer / name).read_bytes())
    cfg = load_preset(setting.preset, vocab_size=len(Kosmos2Tokenizer.from_dir(folder)))
    dtype = torch.bfloat16 if setting.gpu else torch.float32
    save_official(build_random_model(cfg, dtype, torch.device("cpu")), cfg, folder / "random.pt")
    images = sorted(str(p) for p in (setting.data / "eval").rglob("*.jpg"))
    if not images:
        raise RuntimeError(f"no evaluation images under {setting.data / 'eval'}")
    items = [{"id": str(i), "image": images[i % len(images)], "prompt": "An image of"} for i in range(prompts)]
    model = Kosmos2.from_pretrained(str(folder / "random.pt"), device=setting.device,
                                    dtype="bfloat16" if setting.gpu else "float32")
    runner.run(model, items[:batch], folder / "warmup.jsonl", batch_size=batch, max_new_tokens=20, progress=False)
    start = time.perf_counter()
    counts = runner.run(model, items, folder / "predictions.jsonl", batch_size=batch, max_new_tokens=20,
                        progress=False)
    seconds = time.perf_counter() - start
    return {"prompts": counts["predicted"], "batch_size": batch, "max_new_tokens": 20, "seconds": round(seconds, 2),
            "images_s": round(counts["predicted"] / seconds, 2)}


# ---------------------------------------------------------------------------------------------------------------------


def attempt(name: str, fn, *args):
    try:
        return fn(*args)
    except Exception as err:  # one failing check must not hide the others
        log(f"{name} failed: {err}")
        return {"ok": False, "error": f"{type(err).__name__}: {err}"[-3000:], "traceback": traceback.format_exc()[-2000:]}


def run_checks(setting: Setting) -> dict:
    section = {"preset": setting.preset, "device": setting.device, "released_vocabulary": setting.released_vocabulary}
    section["training"] = [attempt("training", check_training_run, setting, run) for run in training_runs(setting)]
    section["attention"] = attempt("attention", check_attention, setting)
    section["generation"] = attempt("generation", check_generation, setting)
    section["evaluation"] = attempt("evaluation", check_evaluation, setting)
    return section


def failed(section) -> bool:
    if isinstance(section, dict):
        return section.get("ok") is False or any(failed(v) for v in section.values())
    if isinstance(section, list):
        return any(failed(v) for v in section)
    return False


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "loadavg": [round(x, 2) for x in os.getloadavg()]}
    with contextlib.suppress(ImportError):
        import deepspeed
        env["deepspeed"] = deepspeed.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2 ** 30, 1),
                   gpus=torch.cuda.device_count())
    return env


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the short version (about 3 minutes on an H100)")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    gpu = torch.cuda.is_available()
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="kosmos2-gpu-check-")))
        work.mkdir(parents=True, exist_ok=True)
        report = {"check": "scripts/gpu_check.sh", "quick": args.quick, "env": environment()}
        if gpu:
            report["gpu"] = run_checks(Setting(args.quick, True, work))
        else:
            report["gpu"] = "not run: no GPU"
            report["cpu"] = run_checks(Setting(args.quick, False, work))  # the same code paths, tiny preset
    report["ok"] = not failed(report)
    report["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(text, flush=True)
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
