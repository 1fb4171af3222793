"""img2dataset output (GRIT) -> TSV shards in the official 6-column layout (docs/official_behaviour.md#grit-tsv).

    python data/prepare_grit.py INPUT... --out DIR [--shard-size 5000] [--workers 4]

INPUT is an img2dataset output folder (`00000/000000001.jpg` + `.json`) or `.tar` shards holding the same
members. Each output line is

    md5(jpeg) \t caption \t base64(jpeg) \t width \t height \t repr({'phrase': noun_chunks, 'expression_v1': ref_exps})

with the image re-encoded as JPEG (PIL default quality, as the official script) and width/height taken from the
json. Differences from the official script, all of which only make rows loadable that it would have broken:
tabs/newlines in captions are replaced by spaces (same length, so character spans stay valid); an image whose
EXIF orientation explains the json's width/height is rotated upright before re-encoding (the TSV has no EXIF);
a json without GRIT fields gives a 5-column caption-only row.

Shards are written atomically (`.tmp` then rename) and recorded in `DIR/manifest.json`; re-running with the same
inputs and shard size skips shards that are already finished. A summary of rows written and skipped by reason is
printed as JSON at the end.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kosmos2.data.rows import format_grit_row  # noqa: E402

MANIFEST = "manifest.json"
SHARD_PATTERN = "grit_{:05d}.tsv"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


# ----------------------------------------------------------------------------- input enumeration

def list_folder_samples(folder: Path) -> list[tuple[str, str]]:
    """(source, key) for every `*.json` that is a sample (img2dataset also writes `NNNNN_stats.json`)."""
    refs = []
    for json_path in sorted(folder.rglob("*.json")):
        if json_path.name.endswith("_stats.json") or json_path.name == MANIFEST:
            continue
        refs.append((str(folder), str(json_path.relative_to(folder).with_suffix(""))))
    return refs


def list_tar_samples(tar_path: Path) -> list[tuple[str, str]]:
    with tarfile.open(tar_path) as tar:
        keys = sorted({os.path.splitext(m.name)[0] for m in tar.getmembers() if m.name.endswith(".json")})
    return [(str(tar_path), key) for key in keys]


def list_samples(inputs: list[str]) -> list[tuple[str, str]]:
    refs = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            tars = sorted(path.glob("*.tar"))
            refs += list_folder_samples(path) if not tars else [r for t in tars for r in list_tar_samples(t)]
        elif path.suffix == ".tar" and path.is_file():
            refs += list_tar_samples(path)
        else:
            raise SystemExit(f"prepare_grit: input {item!r} is neither an img2dataset folder nor a .tar shard")
    return refs


# ----------------------------------------------------------------------------- one sample

class SampleSkipped(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_folder_sample(folder: str, key: str) -> tuple[bytes, bytes | None]:
    base = Path(folder) / key
    meta = base.with_suffix(".json").read_bytes()
    for ext in IMAGE_EXTENSIONS:
        if base.with_suffix(ext).is_file():
            return meta, base.with_suffix(ext).read_bytes()
    return meta, None


def read_tar_sample(tar: tarfile.TarFile, names: set[str], key: str) -> tuple[bytes, bytes | None]:
    meta = tar.extractfile(key + ".json").read()
    for ext in IMAGE_EXTENSIONS:
        if key + ext in names:
            return meta, tar.extractfile(key + ext).read()
    return meta, None


def upright_image(image: Image.Image, width: int, height: int) -> tuple[Image.Image, bool]:
    """Apply the EXIF rotation only when it is what makes the pixels match the json's width/height."""
    if image.size == (width, height):
        return image, False
    rotated = ImageOps.exif_transpose(image)
    if rotated.size == (width, height):
        return rotated, True
    return image, False


def make_row(meta_bytes: bytes, image_bytes: bytes | None) -> tuple[str, bool]:
    """One TSV line (without newline) and whether it carries GRIT annotations; raises SampleSkipped."""
    try:
        meta = json.loads(meta_bytes)
    except (ValueError, UnicodeDecodeError):
        raise SampleSkipped("bad_json")
    if image_bytes is None:
        raise SampleSkipped("missing_image")
    if meta.get("status", "success") != "success":
        raise SampleSkipped("download_failed")
    caption = str(meta.get("caption") or "")
    if not caption.strip():
        raise SampleSkipped("empty_caption")
    try:
        image = Image.open(io.BytesIO(image_bytes))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError):
        raise SampleSkipped("undecodable_image")
    width, height = meta.get("width") or image.size[0], meta.get("height") or image.size[1]
    image, _ = upright_image(image, int(width), int(height))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG")
    has_grit = "noun_chunks" in meta or "ref_exps" in meta
    annotations = {"phrase": meta.get("noun_chunks"), "expression_v1": meta.get("ref_exps")} if has_grit else None
    return format_grit_row(caption, buffer.getvalue(), int(width), int(height), annotations), has_grit


def write_shard(job: tuple[int, list[tuple[str, str]], str]) -> dict:
    """Worker: convert one chunk of samples into `grit_NNNNN.tsv`; returns the shard's manifest entry."""
    index, refs, out_dir = job
    name = SHARD_PATTERN.format(index)
    skipped, rows, caption_only = Counter(), 0, 0
    tmp = Path(out_dir) / (name + ".tmp")
    open_tars: dict[str, tuple[tarfile.TarFile, set[str]]] = {}
    with open(tmp, "w", encoding="utf-8") as out:
        for source, key in refs:
            try:
                if source.endswith(".tar"):
                    if source not in open_tars:
                        tar = tarfile.open(source)
                        open_tars[source] = (tar, set(tar.getnames()))
                    meta, image = read_tar_sample(*open_tars[source], key)
                else:
                    meta, image = read_folder_sample(source, key)
                line, has_grit = make_row(meta, image)
            except SampleSkipped as skip:
                skipped[skip.reason] += 1
                continue
            except (OSError, KeyError, tarfile.TarError):
                skipped["unreadable_input"] += 1
                continue
            out.write(line + "\n")
            rows += 1
            caption_only += not has_grit
    for tar, _ in open_tars.values():
        tar.close()
    os.replace(tmp, Path(out_dir) / name)
    return {"index": index, "name": name, "samples": len(refs), "rows": rows, "caption_only_rows": caption_only,
            "skipped": dict(skipped)}


# ----------------------------------------------------------------------------- driver

def load_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def save_manifest(out_dir: Path, manifest: dict) -> None:
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / MANIFEST)


def summarise(shards: list[dict]) -> dict:
    skipped = Counter()
    for shard in shards:
        skipped.update(shard["skipped"])
    return {"shards": len(shards), "samples": sum(s["samples"] for s in shards), "rows_written": sum(s["rows"] for s in shards),
            "caption_only_rows": sum(s["caption_only_rows"] for s in shards), "skipped": dict(sorted(skipped.items()))}


def prepare(inputs: list[str], out_dir: str | Path, shard_size: int = 5000, workers: int = 1, progress: bool = True) -> dict:
    """Convert every sample of `inputs` into TSV shards under `out_dir`; returns the summary dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    refs = list_samples(inputs)
    if not refs:
        raise SystemExit(f"prepare_grit: no samples (*.json next to an image) found in {inputs}")
    chunks = [refs[i:i + shard_size] for i in range(0, len(refs), shard_size)]
    layout = {"inputs": [str(Path(i).resolve()) for i in inputs], "shard_size": shard_size, "samples": len(refs)}
    manifest = load_manifest(out_dir)
    if manifest.get("layout") != layout:
        manifest = {"layout": layout, "shards": {}}  # different inputs: nothing finished can be trusted
    done = {int(k): v for k, v in manifest["shards"].items() if (out_dir / v["name"]).is_file()}
    jobs = [(i, chunk, str(out_dir)) for i, chunk in enumerate(chunks) if i not in done]
    bar = tqdm(total=len(refs), initial=sum(len(chunks[i]) for i in done), unit="img", desc="prepare_grit", disable=not progress)
    pool = Pool(workers) if workers > 1 and len(jobs) > 1 else None
    results = pool.imap_unordered(write_shard, jobs) if pool else map(write_shard, jobs)
    for entry in results:
        done[entry["index"]] = entry
        manifest["shards"] = {str(k): done[k] for k in sorted(done)}
        save_manifest(out_dir, manifest)  # after every shard, so an interrupted run resumes here
        bar.update(entry["samples"])
    bar.close()
    if pool:
        pool.close()
        pool.join()
    summary = summarise([done[k] for k in sorted(done)])
    manifest["summary"] = summary
    save_manifest(out_dir, manifest)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="img2dataset output folders or .tar shards")
    parser.add_argument("--out", required=True, help="output folder for grit_NNNNN.tsv shards and manifest.json")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per TSV shard")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    summary = prepare(args.inputs, args.out, args.shard_size, args.workers, progress=not args.no_progress)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
