"""Training loader: determinism, exact resume, disjoint ranks, bad-input accounting, text packing, interleaved layout.

The corpus is built in a temporary folder by the real make_synthetic -> prepare_grit path (never data/synthetic)."""
import base64
import copy
import io
import json
import pickle
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from kosmos2.data.iterators import AllRowsBad, ShardRowIterator
from kosmos2.data.mixing import DataConfig, build_train_loader
from kosmos2.data.rows import BadSample
from kosmos2.data.text import TextDocMaker, make_packer
from kosmos2.tokenizer import Kosmos2Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "data"))
import make_synthetic  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic.build(make_synthetic.parse_args([
        "--out", str(out), "--seed", "0", "--num-images", "120", "--eval-images", "4", "--text-docs", "40",
        "--interleaved-docs", "12", "--shard-size", "40", "--workers", "1", "--quiet"]))
    return out


@pytest.fixture(scope="module")
def tok(corpus):
    return Kosmos2Tokenizer.from_dir(corpus / "tokenizer")


def config(corpus, **overrides) -> DataConfig:
    base = dict(laion_data_dir=str(corpus / "grit"), data=str(corpus / "text"), interleaved_data_dir=str(corpus / "interleaved"),
                data_weights=(1, 2, 1), laion_batch_size=3, max_sentences=2, interleaved_batch_size=2, tokens_per_sample=96,
                latent_query_num=8, input_resolution=32, batch_read_ahead=8, seed=5, log_interval=0)
    base.update(overrides)
    return DataConfig(**base)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        (name, bx), (_, by) = next(iter(x.items())), next(iter(y.items()))
        for key in bx:
            if isinstance(bx[key], torch.Tensor):
                assert torch.equal(bx[key], by[key]), f"{name}.{key} differs"
            else:
                assert bx[key] == by[key], f"{name}.{key} differs"


def test_batch_layout_per_stream(corpus, tok):
    with build_train_loader(config(corpus), tok) as loader:
        seen = {}
        for batch in take(loader, 12):
            (name, b), = batch.items()
            seen[name] = b
    assert set(seen) == {"vl_laion", "gpt", "vl_interleaved"}
    grit = seen["vl_laion"]
    B, T = grit["src_tokens"].shape
    assert grit["img_src_tokens"].shape == (B, 3, 32, 32) and grit["img_src_tokens"].dtype == torch.float32
    assert grit["img_gpt_input_mask"].sum(1).tolist() == [8] * B  # Q slots per image
    assert grit["src_tokens"].dtype == torch.long and grit["gpt_loss_mask"].dtype == torch.bool
    assert (grit["src_tokens"][:, 0] == tok.bos).all() and (grit["src_tokens"][:, 1:10] == tok.boi).all()
    assert (grit["src_tokens"][:, 10] == tok.eoi).all()
    assert seen["gpt"]["img_src_tokens"] is None and seen["gpt"]["gpt_loss_mask"].all()
    inter = seen["vl_interleaved"]
    assert inter["img_src_tokens"].shape[0] * 8 == int(inter["img_gpt_input_mask"].sum())


def test_same_seed_same_batches_other_seed_differs(corpus, tok):
    a = take(build_train_loader(config(corpus), tok), 8)
    b = take(build_train_loader(config(corpus), tok), 8)
    assert_same_batches(a, b)
    c = take(build_train_loader(config(corpus, seed=6), tok), 8)
    with pytest.raises(AssertionError):
        assert_same_batches(a, c)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_uninterrupted_batches(corpus, tok, num_workers):
    cfg = config(corpus, num_workers=num_workers, prefetch_buffer=2)
    with build_train_loader(cfg, tok) as reference:
        take(reference, 5)
        state = pickle.loads(pickle.dumps(reference.state_dict()))  # as it travels through a checkpoint
        expected = take(reference, 7)
        expected_counts = reference.skip_counts()
    with build_train_loader(cfg, tok) as resumed:
        resumed.load_state_dict(copy.deepcopy(state))
        assert_same_batches(take(resumed, 7), expected)
        assert resumed.skip_counts() == expected_counts


def test_workers_do_not_change_within_worker_order_and_prefetch_is_transparent(corpus, tok):
    in_process = take(build_train_loader(config(corpus, num_workers=0), tok), 6)
    with build_train_loader(config(corpus, num_workers=1, prefetch_buffer=3), tok) as prefetched:
        assert_same_batches(take(prefetched, 6), in_process)


# ----------------------------------------------------------------------------- sharding

def lines_seen(shards, instance, instances, n):
    it = ShardRowIterator(shards, lambda rng, line, dropped: line, seed=0, instance=instance, instances=instances)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("num_shards, instances", [(4, 2), (1, 2), (3, 4)])
def test_instances_see_disjoint_rows(tmp_path, num_shards, instances):
    shards = []
    for s in range(num_shards):
        path = tmp_path / f"s{s}.tsv"
        path.write_text("".join(f"row {s}-{i}\n" for i in range(6)))
        shards.append(str(path))
    # rows per instance in one pass: whole shards (enough shards) or every instances-th line of every shard
    per_instance = [6 * len(range(r, num_shards, instances)) if num_shards >= instances
                    else num_shards * len(range(r, 6, instances)) for r in range(instances)]
    seen = [lines_seen(shards, r, instances, per_instance[r]) for r in range(instances)]
    for r in range(instances):
        assert len(set(seen[r])) == len(seen[r])  # one pass, no repeats
        for q in range(r + 1, instances):
            assert not set(seen[r]) & set(seen[q])
    assert set().union(*seen) == {f"row {s}-{i}\n" for s in range(num_shards) for i in range(6)}


def test_two_ranks_get_different_batches(corpus, tok):
    cfg = config(corpus, data_weights=(0, 1, 0), batch_read_ahead=0)
    r0 = take(build_train_loader(cfg, tok, rank=0, world_size=2), 4)
    r1 = take(build_train_loader(cfg, tok, rank=1, world_size=2), 4)
    rows0 = {tuple(row.tolist()) + (float(img.sum()),) for b in r0 for row, img in zip(b["vl_laion"]["src_tokens"], b["vl_laion"]["img_src_tokens"])}
    rows1 = {tuple(row.tolist()) + (float(img.sum()),) for b in r1 for row, img in zip(b["vl_laion"]["src_tokens"], b["vl_laion"]["img_src_tokens"])}
    assert not rows0 & rows1


# ----------------------------------------------------------------------------- bad input

def jpeg_b64(size=(40, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode()


def broken_shard_lines() -> tuple[list[str], dict]:
    good_ann = str({"phrase": [[0, 13, 0.1, 0.1, 0.6, 0.6, 0.9]], "expression_v1": [[0, 13, 0.1, 0.1, 0.6, 0.6, 0.9]]})
    img = jpeg_b64()
    raw = base64.b64decode(img)
    good = ["m\ta green square\t{}\t40\t30\t{}".format(img, good_ann),
            "m\ta green square\t{}\t40\t30\t{}".format(img, str({"phrase": [], "expression_v1": []})),  # plain caption
            "m\ta green square\t{}\t40\t30\t{}".format(img, str({"phrase": [[0, 13, 0.5, 0.5, 0.5, 0.9, 0.9]],
                                                                  "expression_v1": [[0, 13, 0.5, 0.5, 0.5, 0.9, 0.9], [0, 40, .1, .1, .2, .2, .9]]}))]
    bad = {
        "bad_base64": f"m\ta green square\t%%%not-base64%%%\t40\t30\t{good_ann}",
        "not_an_image": "m\ta green square\t{}\t40\t30\t{}".format(base64.b64encode(b"hello world, no image").decode(), good_ann),
        "broken_image": "m\ta green square\t{}\t40\t30\t{}".format(base64.b64encode(raw[: len(raw) // 2]).decode(), good_ann),
        "wrong_column_count": "m\ta green square\t{}\t40".format(img),
        "bad_size": "m\ta green square\t{}\tforty\t30\t{}".format(img, good_ann),
        "bad_annotations": "m\ta green square\t{}\t40\t30\t{{'phrase': [[0, 1".format(img),
        "empty_caption": "m\t  \t{}\t40\t30\t{}".format(img, good_ann),
        "no_annotations": "m\ta green square\t{}\t40\t30".format(img),
    }
    return good, bad


def test_check_tsv_counts_exactly_the_good_rows(tmp_path):
    import check_tsv

    good, bad = broken_shard_lines()
    shard = tmp_path / "broken.tsv"
    shard.write_text("\n".join(good[:1] + list(bad.values()) + good[1:]) + "\n")
    report = check_tsv.main([str(shard), "--json"])
    assert report["rows"] == len(good) + len(bad)
    assert report["ok"] == len(good) and report["grounded"] == 1
    assert report["skipped"] == {reason: 1 for reason in bad}
    assert report["annotations_dropped"] == {"ann:zero_area_box": 1, "ann:span_out_of_range": 1}


def test_loader_skips_and_counts_bad_rows_and_shards(tmp_path, tok):
    good, bad = broken_shard_lines()
    data = tmp_path / "grit"
    (data / "json").mkdir(parents=True)
    (data / "broken.tsv").write_text("\n".join(list(bad.values()) + good) + "\n")
    (data / "json" / "train.json").write_text(json.dumps([{"source": ["broken.tsv", "missing.tsv"], "weight": 1.0}]))
    cfg = DataConfig(laion_data_dir=str(data), data_weights=(0, 1, 0), laion_batch_size=1, latent_query_num=4,
                     input_resolution=32, batch_read_ahead=0, seed=0, log_interval=1)
    loader = build_train_loader(cfg, tok)
    take(loader, 2 * len(good) + 1)  # wraps around both shards at least once
    counts = loader.skip_counts()["vl_laion"]
    for reason in bad:
        assert counts[reason] >= 1
    assert counts["missing_shard"] >= 1 and counts["ann:zero_area_box"] >= 1


def test_stream_with_only_bad_rows_fails_loudly(tmp_path, tok):
    _, bad = broken_shard_lines()
    data = tmp_path / "grit"
    (data / "json").mkdir(parents=True)
    (data / "bad.tsv").write_text("\n".join(bad.values()) + "\n")
    (data / "json" / "train.json").write_text(json.dumps([{"source": ["bad.tsv", "gone.tsv"], "weight": 1.0}]))
    loader = build_train_loader(DataConfig(laion_data_dir=str(data), data_weights=(0, 1, 0), input_resolution=32,
                                           latent_query_num=4, batch_read_ahead=0), tok)
    with pytest.raises(AllRowsBad, match="without one usable row"):
        next(loader)


# ----------------------------------------------------------------------------- text and interleaved

def test_text_packing(tok):
    maker = TextDocMaker(tok, tokens_per_sample=12)
    doc = maker(None, json.dumps({"text": "a red circle\n\nthe blue square is easy to see on a white background\na square"}), Counter())
    assert len(doc) == 3  # the empty line is dropped
    assert doc[0] == tok.encode_text("a red circle") + [tok.index("</line>")]
    assert len(doc[1]) == 11  # a line longer than a sample is cut to tokens_per_sample - 1
    assert doc[2] == tok.encode_text("a square") + [tok.eos]
    step = make_packer(tok.bos, 12)
    pending, finished = step(None, doc)
    pending, more = step(pending, doc)
    samples = finished + more
    assert all(s.tokens[0] == tok.bos and len(s.tokens) <= 12 for s in samples + [])
    assert samples[0].tokens == [tok.bos] + doc[0]
    assert all(s.loss_mask == [True] * len(s.tokens) for s in samples)
    with pytest.raises(BadSample):
        maker(None, "not json", Counter())


def test_interleaved_truncation_never_cuts_an_image(corpus, tok):
    from kosmos2.data.interleaved import InterleavedDocMaker

    line = (corpus / "interleaved" / "train.jsonl").read_text().splitlines()[0]
    q = 8
    full = InterleavedDocMaker(tok, corpus / "interleaved", 32, q, tokens_per_sample=1000)(None, line, Counter())
    assert len(full.images) >= 2 and sum(full.image_mask) == q * len(full.images)
    boi_positions = [i for i, t in enumerate(full.tokens) if t == tok.boi and not full.image_mask[i]]
    cut = boi_positions[1] + 3  # a limit that falls inside the second image block
    short = InterleavedDocMaker(tok, corpus / "interleaved", 32, q, tokens_per_sample=cut)(None, line, Counter())
    assert len(short.images) == 1 and len(short) <= cut and short.tokens[-1] == tok.eos
    assert short.tokens[:-1] == full.tokens[: len(short) - 1]
    # loss: never predicting <image>, slots or </image>; text after an image is learned
    for i in range(len(full) - 1):
        nxt_in_image = full.tokens[i + 1] in (tok.boi, tok.eoi)
        assert full.loss_mask[i] == (not nxt_in_image)
