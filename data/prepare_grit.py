"""img2dataset output (GRIT) -> TSV shards in the official 6-column layout (docs/official_behaviour.md#grit-tsv).

    python data/prepare_grit.py INPUT... --out DIR [--shard-size 5000] [--workers 4] [--annotations GRIT...]

INPUT is an img2dataset output folder (`00000/000000001.jpg` + `.json`), `.tar` shards holding the same
members, or a JSONL of `{"id", "caption", "image": path}` pairs (kosmos2/data/pair_sources.py). The GRIT fields
come from each sample's json (the released GRIT, downloaded by img2dataset with the GRIT columns saved), or with
`--annotations` from GRIT jsonl records (data/build_grit.py output) joined to the samples by key; samples without
a record are skipped (`no_grit_record`). Each output line is

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


from kosmos2.data.grit_builder import grit_files
from kosmos2.data.pair_sources import PairReader, PairRef, PairSkipped, list_pairs, parse_meta
from kosmos2.data.rows import format_grit_row

MANIFEST = "manifest.json"
SHARD_PATTERN = "grit_{:05d}.tsv"


# ----------------------------------------------------------------------------- one sample

def upright_image(image: Image.Image, width: int, height: int) -> tuple[Image.Image, bool]:
    """Apply the EXIF rotation only when it is what makes the pixels match the json's width/height."""
    if image.size == (width, height):
        return image, False
    rotated = ImageOps.exif_transpose(image)
    if rotated.size == (width, height):
        return rotated, True
    return image, False


def make_row(meta: dict, image_bytes: bytes | None) -> tuple[str, bool]:
    """One TSV line (without newline) and whether it carries GRIT annotations; raises PairSkipped."""
    if image_bytes is None:
        raise PairSkipped("missing_image")
    if meta.get("status", "success") != "success":
        raise PairSkipped("download_failed")
    caption = str(meta.get("caption") or "")
    if not caption.strip():
        raise PairSkipped("empty_caption")
    try:
        image = Image.open(io.BytesIO(image_bytes))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError):
        raise PairSkipped("undecodable_image")
    width, height = meta.get("width") or image.size[0], meta.get("height") or image.size[1]
    image, _ = upright_image(image, int(width), int(height))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG")
    has_grit = "noun_chunks" in meta or "ref_exps" in meta
    annotations = {"phrase": meta.get("noun_chunks"), "expression_v1": meta.get("ref_exps")} if has_grit else None
    return format_grit_row(caption, buffer.getvalue(), int(width), int(height), annotations), has_grit


def read_sample(reader: PairReader, ref: PairRef, annotation: dict | None, joined: bool) -> tuple[str, bool]:
    """One pair -> (TSV line, has GRIT fields). With `joined` (--annotations) the pair's GRIT fields come from its
    GRIT record (`annotation`), and a pair without one is skipped."""
    meta = parse_meta(reader.read_meta(ref))
    if joined:
        if annotation is None:
            raise PairSkipped("no_grit_record")
        meta = {**meta, **annotation}
    return make_row(meta, reader.read_image(ref, meta))


def write_shard(job: tuple[int, list[PairRef], str, dict | None]) -> dict:
    """Worker: convert one chunk of samples into `grit_NNNNN.tsv`; returns the shard's manifest entry.
    `annotations` is None, or the GRIT records of this chunk's keys (--annotations)."""
    index, refs, out_dir, annotations = job
    name = SHARD_PATTERN.format(index)
    skipped, rows, caption_only = Counter(), 0, 0
    tmp = Path(out_dir) / (name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out, PairReader() as reader:
        for ref in refs:
            try:
                line, has_grit = read_sample(reader, ref, (annotations or {}).get(ref.key), annotations is not None)
            except PairSkipped as skip:
                skipped[skip.reason] += 1
                continue
            except (OSError, KeyError, tarfile.TarError):
                skipped["unreadable_input"] += 1
                continue
            out.write(line + "\n")
            rows += 1
            caption_only += not has_grit
    os.replace(tmp, Path(out_dir) / name)
    return {"index": index, "name": name, "samples": len(refs), "rows": rows, "caption_only_rows": caption_only,
            "skipped": dict(skipped)}


def load_annotations(paths: list[str]) -> dict[str, dict]:
    """key -> GRIT record from GRIT jsonl files or data/build_grit.py output folders."""
    records = {}
    for path in paths:
        files = grit_files(path)
        if not files or not all(f.is_file() for f in files):
            raise SystemExit(f"prepare_grit: --annotations {path}: no GRIT jsonl there (grit-*-of-*.jsonl or a .jsonl file)")
        for file in files:
            with open(file, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if "key" not in record:
                            raise SystemExit(f"prepare_grit: {file}:{number}: a GRIT record without \"key\"")
                        records[str(record["key"])] = record
    return records


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


def prepare(inputs: list[str], out_dir: str | Path, shard_size: int = 5000, workers: int = 1, progress: bool = True,
            annotations: list[str] | None = None) -> dict:
    """Convert every sample of `inputs` into TSV shards under `out_dir`; returns the summary dict. With
    `annotations` (GRIT jsonl files / builder folders) each sample's GRIT fields come from its record there."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    refs = list_pairs(inputs)
    if not refs:
        raise SystemExit(f"prepare_grit: no samples (*.json next to an image, or pairs .jsonl lines) found in {inputs}")
    records = load_annotations(annotations) if annotations else None
    chunks = [refs[i:i + shard_size] for i in range(0, len(refs), shard_size)]
    layout = {"inputs": [str(Path(i).resolve()) for i in inputs], "shard_size": shard_size, "samples": len(refs),
              "annotations": [str(Path(a).resolve()) for a in annotations] if annotations else None}
    manifest = load_manifest(out_dir)
    if manifest.get("layout") != layout:
        manifest = {"layout": layout, "shards": {}}  # different inputs: nothing finished can be trusted
    done = {int(k): v for k, v in manifest["shards"].items() if (out_dir / v["name"]).is_file()}
    jobs = [(i, chunk, str(out_dir), None if records is None else {r.key: records[r.key] for r in chunk if r.key in records})
            for i, chunk in enumerate(chunks) if i not in done]
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
    parser.add_argument("inputs", nargs="+", help="img2dataset output folders or .tar shards, or pairs .jsonl files")
    parser.add_argument("--annotations", nargs="+", default=None,
                        help="GRIT jsonl files or data/build_grit.py output folders: take each pair's GRIT fields from "
                             "its record (joined by key) and skip pairs without one")
    parser.add_argument("--out", required=True, help="output folder for grit_NNNNN.tsv shards and manifest.json")
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per TSV shard")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    summary = prepare(args.inputs, args.out, args.shard_size, args.workers, progress=not args.no_progress,
                      annotations=args.annotations)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
