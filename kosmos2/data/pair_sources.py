"""Where image-text pairs come from: img2dataset folders, img2dataset `.tar` shards, and a JSONL of pairs.

Both `data/prepare_grit.py` (pairs -> TSV) and the GRIT builder (`data/build_grit.py`, pairs -> GRIT jsonl) read
their inputs through this module, so they agree on what a pair is and on its key:

* img2dataset folder: `00000/000000001.jpg` + `.json` (+ `.txt`); `NNNNN_stats.json` files are not samples;
* img2dataset `.tar` shard: the same members inside a tar; a folder holding `*.tar` files means those shards;
* pairs JSONL: one `{"id": ..., "caption": ..., "image": PATH}` per line, PATH absolute or relative to the jsonl's
  folder; any other field (`url`, `width`, `height`, `clip_similarity_*`, ...) is kept in the pair's json.

A pair's *key* is img2dataset's file name stem (`000000001`) or the JSONL record's `id` as a string. The builder
writes it as the GRIT record's `key`, and prepare_grit joins builder output to images by it.
"""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import NamedTuple

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
RECORD_JSON_NAMES = ("manifest.json", "build.json", "summary.json")  # our tools' run records, not samples


class PairRef(NamedTuple):
    """Where one pair lives: enough to read it later, in any process."""
    source: str   # img2dataset folder, .tar shard or pairs .jsonl
    member: str   # folder/tar: the sample's path without extension; jsonl: byte offset of its line
    key: str      # the pair's key (see the module docstring)


def _folder_refs(folder: Path) -> list[PairRef]:
    refs = []
    for json_path in sorted(folder.rglob("*.json")):
        name = json_path.name
        if name.endswith(("_stats.json", ".summary.json")) or name in RECORD_JSON_NAMES:  # img2dataset's / ours
            continue
        member = str(json_path.relative_to(folder).with_suffix(""))
        refs.append(PairRef(str(folder), member, Path(member).name))
    return refs


def _tar_refs(tar_path: Path) -> list[PairRef]:
    with tarfile.open(tar_path) as tar:
        members = sorted({os.path.splitext(m.name)[0] for m in tar.getmembers() if m.name.endswith(".json")})
    return [PairRef(str(tar_path), member, Path(member).name) for member in members]


def _jsonl_refs(path: Path) -> list[PairRef]:
    refs, offset = [], 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise SystemExit(f"{path}:{number}: not a JSON object ({err})")
                if not isinstance(record, dict) or record.get("id") is None:
                    raise SystemExit(f"{path}:{number}: a pairs JSONL line needs an \"id\" (and \"caption\", \"image\")")
                refs.append(PairRef(str(path), str(offset), str(record["id"])))
            offset += len(line)
    return refs


def list_pairs(inputs: list[str]) -> list[PairRef]:
    """Every pair of `inputs`, in a deterministic order (inputs as given, then sorted within each)."""
    refs = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            tars = sorted(path.glob("*.tar"))
            refs += [r for t in tars for r in _tar_refs(t)] if tars else _folder_refs(path)
        elif path.is_file() and path.suffix == ".tar":
            refs += _tar_refs(path)
        elif path.is_file() and path.suffix == ".jsonl":
            refs += _jsonl_refs(path)
        else:
            raise SystemExit(f"input {item!r} is neither an img2dataset folder, a .tar shard nor a pairs .jsonl")
    return refs


class PairSkipped(Exception):
    """A pair that yields nothing; `reason` is its key in the run's summary ("bad_json", "missing_image", ...)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse_meta(raw: bytes) -> dict:
    """A pair's img2dataset json; raises PairSkipped("bad_json") when it is not a JSON object."""
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise PairSkipped("bad_json")
    if not isinstance(meta, dict):
        raise PairSkipped("bad_json")
    return meta


class PairReader:
    """Reads pairs by `PairRef`; keeps `.tar` files open between calls (use as a context manager, or `close()`)."""

    def __init__(self):
        self._tars: dict[str, tuple[tarfile.TarFile, set[str]]] = {}

    def _tar(self, source: str) -> tuple[tarfile.TarFile, set[str]]:
        if source not in self._tars:
            tar = tarfile.open(source)
            self._tars[source] = (tar, set(tar.getnames()))
        return self._tars[source]

    def read_meta(self, ref: PairRef) -> bytes:
        """The pair's json (img2dataset `.json`, or the JSONL line) as bytes; OSError/KeyError if unreadable."""
        if ref.source.endswith(".jsonl"):
            with open(ref.source, "rb") as f:
                f.seek(int(ref.member))
                return f.readline()
        if ref.source.endswith(".tar"):
            return self._tar(ref.source)[0].extractfile(ref.member + ".json").read()
        return (Path(ref.source) / ref.member).with_suffix(".json").read_bytes()

    def read_image(self, ref: PairRef, meta: dict) -> bytes | None:
        """The image file's bytes, or None when the pair has no image file."""
        if ref.source.endswith(".jsonl"):
            image = meta.get("image")
            if not image:
                return None
            path = Path(image) if os.path.isabs(image) else Path(ref.source).parent / image
            return path.read_bytes() if path.is_file() else None
        if ref.source.endswith(".tar"):
            tar, names = self._tar(ref.source)
            for ext in IMAGE_EXTENSIONS:
                if ref.member + ext in names:
                    return tar.extractfile(ref.member + ext).read()
            return None
        base = Path(ref.source) / ref.member
        for ext in IMAGE_EXTENSIONS:
            if base.with_suffix(ext).is_file():
                return base.with_suffix(ext).read_bytes()
        return None

    def close(self) -> None:
        for tar, _ in self._tars.values():
            tar.close()
        self._tars.clear()

    def __enter__(self) -> "PairReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
