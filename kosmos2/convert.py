"""Convert Kosmos-2 checkpoints between the official fairseq layout and Hugging Face folders, losslessly.

    python -m kosmos2.convert kosmos-2.pt hf_folder/ --to hf
    python -m kosmos2.convert hf_folder/ kosmos-2.pt --to official [--dtype fp16]

Tensors are copied bit for bit (fp16 stays fp16 unless --dtype says otherwise); tokenizer files found next to SRC
(`sentencepiece.bpe.model`, `dict.txt`) are copied next to DST.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_state, save_hf, save_official
from .safe_pickle import UnsafeCheckpointError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKENIZER_FILES = ("sentencepiece.bpe.model", "dict.txt")


def tokenizer_dir_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def copy_tokenizer_files(src: Path, dst_dir: Path) -> list[str]:
    src_dir = tokenizer_dir_of(src)
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file() and (src_dir / name).resolve() != (dst_dir / name).resolve():
            shutil.copyfile(src_dir / name, dst_dir / name)
            copied.append(name)
    spm, dict_txt = dst_dir / TOKENIZER_FILES[0], dst_dir / TOKENIZER_FILES[1]
    if spm.is_file() and not dict_txt.exists():
        # HF folders ship only the sentencepiece model; the fairseq dictionary is derived from it.
        from .tokenizer import Kosmos2Tokenizer

        Kosmos2Tokenizer.build_dictionary_file(spm, dict_txt)
        copied.append("dict.txt (built from sentencepiece.bpe.model)")
    return copied


def convert(src: str | Path, dst: str | Path, to: str, dtype: str | None = None) -> dict:
    src, dst = Path(src), Path(dst)
    sd, cfg, src_format = load_state(src)
    if dtype is not None:
        sd = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in sd.items()}
    if to == "hf":
        save_hf(sd, cfg, dst)
        dst_dir = dst
    elif to == "official":
        if dst.is_dir():
            raise CheckpointError(f"{dst} is a folder; --to official writes a file, e.g. {dst / 'kosmos-2.pt'}")
        save_official(sd, cfg, dst)
        dst_dir = dst.parent
    else:
        raise ValueError(f"--to must be 'hf' or 'official', not {to!r}")
    copied = copy_tokenizer_files(src, dst_dir)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values() if v.is_floating_point()})
    return {"src": str(src), "src_format": src_format, "dst": str(dst), "dst_format": to, "tensors": len(sd),
            "dtypes": dtypes, "architecture": cfg.summary(), "tokenizer_files": copied}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kosmos2.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="official/our .pt checkpoint, or a Hugging Face folder (config.json + model.safetensors)")
    parser.add_argument("dst", help="output .pt file (--to official) or folder (--to hf)")
    parser.add_argument("--to", required=True, choices=["official", "hf"])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default: keep)")
    args = parser.parse_args(argv)
    try:
        report = convert(args.src, args.dst, args.to, args.dtype)
    except (CheckpointError, UnsafeCheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"kosmos2.convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"converted {report['src']} ({report['src_format']}) -> {report['dst']} ({report['dst_format']}): "
          f"{report['tensors']} tensors, {'/'.join(report['dtypes'])}, {report['architecture']}"
          + (f"; copied {', '.join(report['tokenizer_files'])}" if report["tokenizer_files"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
