"""GPU smoke test of xl training: the official recipe, a few updates from random init, tokens/s and MFU as JSON.

    python scripts/gpu_smoke_xl.py [--updates 30] [--tokenizer DIR] [--precision bf16|fp16] [--extra "--flag value ..."]
    python scripts/gpu_smoke_xl.py --cpu --arch unigptmodel_tiny --updates 3      # the same path on a laptop (CI)

It runs `python -m fairseq_plugins.train` with the flags of `configs/train/xl_official.sh`, changed only where a smoke
run must differ: the synthetic GRIT shards (`data/synthetic`, made if missing) instead of GRIT, no ViT weights file
(random ViT), no checkpoints written (`--no-save`), `--max-update N`, one log line per update, and the precision
(`bf16`: `--bf16 --optimizer torch_adamw`, fp32 master weights and fused AdamW; `fp16`: the official
`--memory-efficient-fp16 --optimizer adam`). Activation checkpointing and SDPA attention stay on, as in the recipe.

The tokenizer decides the vocabulary: pass the released `dict.txt` + `sentencepiece.bpe.model` folder (or set
KOSMOS2_ASSETS) for the real 65037-token head; without it the synthetic corpus's small vocabulary is used and the JSON
says so. The last line printed is one JSON object:

    {"arch", "updates", "precision", "vocab_size", "trainable_params", "tokens_s" (median fairseq wps over the second
     half of the updates), "sequences_s", "mfu" (6 x trainable params x tokens/s / the GPU's dense peak; null when the
     GPU is not in kosmos2.bench.GPU_PEAK_FLOPS or on CPU), "peak_gpu_mem_gb", "device", "loss_first", "loss_last"}
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Recipe flags the smoke run replaces: (flag, number of values it takes)
REPLACED = {"--visual-pretrained": 1, "--memory-efficient-fp16": 0, "--fp16-init-scale": 1, "--optimizer": 1,
            "--max-update": 1, "--total-num-update": 1, "--log-interval": 1, "--log-format": 1, "--save-dir": 1,
            "--tensorboard-logdir": 1, "--laion-data-dir": 1, "--data-weights": 1, "--dict-path": 1, "--spm-model": 1,
            "--arch": 1, "--warmup-updates": 1, "--visual-model-name": 1, "--visual-output-dim": 1}


def recipe_flags() -> list[str]:
    out = subprocess.run(["bash", str(REPO / "configs/train/xl_official.sh")], capture_output=True, text=True, check=True)
    return shlex.split(out.stdout)


def without(flags: list[str], replaced: dict[str, int]) -> list[str]:
    kept, i = [], 0
    while i < len(flags):
        if flags[i] in replaced:
            i += 1 + replaced[flags[i]]
            continue
        kept.append(flags[i])
        i += 1
    return kept


def ensure_corpus(data: Path) -> None:
    if not (data / "grit" / "json" / "train.json").is_file():
        print(f"[smoke] building a small synthetic corpus in {data}", flush=True)
        subprocess.run([sys.executable, str(REPO / "data/make_synthetic.py"), "--out", str(data), "--num-images", "600",
                        "--eval-images", "2", "--text-docs", "20", "--interleaved-docs", "4", "--quiet"], check=True)


def tokenizer_dir(arg: str | None, data: Path) -> tuple[Path, bool]:
    """(folder with dict.txt + sentencepiece.bpe.model, whether it is the released vocabulary)."""
    for candidate in (arg, os.environ.get("KOSMOS2_ASSETS")):
        if candidate and (Path(candidate) / "dict.txt").is_file():
            return Path(candidate), True
    return data / "tokenizer", False


def train_args(args, tok: Path, save_dir: Path) -> list[str]:
    precision = [] if args.cpu else (["--bf16", "--optimizer", "torch_adamw"] if args.precision == "bf16" else
                                     ["--memory-efficient-fp16", "--fp16-init-scale", "4", "--optimizer", "adam"])
    if args.cpu:
        precision = ["--cpu", "--optimizer", "adam"]
    return [*without(recipe_flags(), REPLACED), "--arch", args.arch, *precision,
            "--laion-data-dir", str(args.data / "grit"), "--data-weights", "0,1,0",
            "--dict-path", str(tok / "dict.txt"), "--spm-model", str(tok / "sentencepiece.bpe.model"),
            "--max-update", str(args.updates), "--total-num-update", str(max(args.updates, 2)),
            "--warmup-updates", str(max(1, args.updates // 4)),
            "--log-format", "json", "--log-interval", "1", "--no-save", "--save-dir", str(save_dir),
            *shlex.split(args.extra)]


def parse_log(text: str) -> dict:
    updates = []
    for line in text.splitlines():
        if "| train_inner |" in line and "{" in line:
            updates.append(json.loads(line[line.index("{"):]))
    trained = re.search(r"num\. trained: ([\d,]+)", text)
    return {"updates": updates, "trainable_params": int(trained.group(1).replace(",", "")) if trained else None}


def summarise(parsed: dict, args, vocab_is_released: bool, vocab_size: int) -> dict:
    from kosmos2.bench import gpu_peak_flops

    updates = parsed["updates"]
    if not updates:
        raise RuntimeError("no training log lines were found: see the log above")
    steady = updates[len(updates) // 2:] or updates  # the first updates include warm-up (allocator, kernels)
    tokens_s = statistics.median(float(u["wps"]) for u in steady)
    sequences_s = statistics.median(float(u["bsz"]) * float(u["ups"]) for u in steady)
    device = "cpu"
    peak_mem = mfu = None
    if not args.cpu:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
            peak = gpu_peak_flops(torch.device("cuda"), args.precision)
            if peak and parsed["trainable_params"]:
                mfu = round(6 * parsed["trainable_params"] * tokens_s / peak, 4)
    gb = [float(u[k]) for u in updates for k in ("gb_used", "cuda_gb_allocated") if k in u]
    peak_mem = max(gb) if gb else None
    return {"arch": args.arch, "updates": len(updates), "precision": "fp32" if args.cpu else args.precision,
            "vocab_size": vocab_size, "released_vocabulary": vocab_is_released,
            "trainable_params": parsed["trainable_params"], "tokens_s": round(tokens_s, 1),
            "sequences_s": round(sequences_s, 2), "mfu": mfu, "peak_gpu_mem_gb": peak_mem, "device": device,
            "loss_first": float(updates[0]["loss"]), "loss_last": float(updates[-1]["loss"])}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="unigptmodel_xl")
    parser.add_argument("--updates", type=int, default=30)
    parser.add_argument("--precision", choices=["bf16", "fp16"], default="bf16")
    parser.add_argument("--tokenizer", help="folder with the released dict.txt + sentencepiece.bpe.model")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "synthetic")
    parser.add_argument("--cpu", action="store_true", help="run on CPU in fp32 (checks the path, not the speed)")
    parser.add_argument("--extra", default="", help="more fairseq-train flags, appended last (they win)")
    args = parser.parse_args(argv)

    ensure_corpus(args.data)
    tok, released = tokenizer_dir(args.tokenizer, args.data)
    from kosmos2.tokenizer import Kosmos2Tokenizer

    vocab_size = len(Kosmos2Tokenizer.from_dir(tok).dictionary)
    with tempfile.TemporaryDirectory(prefix="kosmos2-smoke-") as save_dir:
        command = [sys.executable, "-m", "fairseq_plugins.train", *train_args(args, tok, Path(save_dir))]
        print("[smoke] " + shlex.join(command), flush=True)
        env = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "ignore")}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    sys.stdout.write(done.stdout[-4000:])
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"[smoke] training failed with exit status {done.returncode}")
    result = summarise(parse_log(done.stdout), args, released, vocab_size)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
