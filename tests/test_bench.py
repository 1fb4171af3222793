"""Smoke tests of `python -m kosmos2.bench` on the tiny preset: the JSON it prints, and that our greedy generation
gives exactly transformers' tokens for the same weights. No timing assertions (CPU time is shared here)."""
import json

import pytest
import torch

from kosmos2 import build_model, load_preset
from kosmos2.bench import decode_bytes_per_step, grounding_prompt, main

from helpers import expected_cpu_path

GENERATE_KEYS = {"prefill_s", "decode_tok_s", "decode_step_ms_median", "peak_rss_mb", "decode_floor_ms_per_step",
                 "decode_floor_tok_s", "read_gb_s", "weights_read_per_step_mb", "env"}


def run(capsys, *argv) -> dict:
    result = main(list(argv))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1, "the benchmark must print exactly one JSON line"
    assert json.loads(lines[0]) == json.loads(json.dumps(result))
    return result


def test_xl_prompt_is_the_official_layout():
    ids, mask = grounding_prompt(load_preset("xl"))
    # the demo's "Brief" prompt (docs/official_behaviour.md#prompt-layout)
    assert ids == [0, 64003, *range(4, 68), 64004, 64012, 712, 1648, 9] and len(ids) == 71
    assert mask == [False, False] + [True] * 64 + [False] * 5


def test_decode_bytes_are_the_decoder_weights_with_the_head():
    """Per step the decoder reads each of its matrices once; the tied head reads the whole embedding matrix."""
    model = build_model(load_preset("xl"), device="meta")
    decoder = model.decoder
    assert decode_bytes_per_step(model) == 4 * sum(p.numel() for p in decoder.parameters())


def test_generate_tiny_matches_transformers(capsys):
    pytest.importorskip("transformers")
    result = run(capsys, "generate", "--preset", "tiny", "--new-tokens", "8", "--repeats", "1", "--batch-size", "2",
                 "--compare-transformers")
    assert GENERATE_KEYS <= set(result) and GENERATE_KEYS - {"decode_floor_ms_per_step", "decode_floor_tok_s",
                                                             "read_gb_s", "weights_read_per_step_mb", "env"} \
        <= set(result["transformers"])
    assert result["tokens_equal"] is True and result["first_divergence_step"] is None
    # <s> <image> [one slot per latent query] </image> <grounding> An image of
    assert result["generated_tokens"] > 0 and result["prompt_tokens"] == 2 + load_preset("tiny").latent_query_num + 5
    assert {"decode_speedup", "prefill_ratio", "peak_rss_ratio"} <= set(result)
    assert result["env"]["loadavg"] and result["env"]["torch"] == torch.__version__


def test_train_tiny_json(capsys):
    pytest.importorskip("transformers")
    seq_len = load_preset("tiny").latent_query_num + 3 + 13  # <s> <image> slots </image> + 13 text tokens
    result = run(capsys, "train", "--preset", "tiny", "--batch-size", "2", "--seq-len", str(seq_len), "--steps", "1",
                 "--repeats", "1", "--compare-transformers")
    assert {"step_s", "tokens_s", "peak_rss_mb", "trainable_params", "tokens_s_speedup", "env"} <= set(result)
    assert result["same_trainable_params"] is True  # both train the decoder and connector, not the ViT


def test_machine_json(capsys):
    result = run(capsys, "machine")
    assert {"copy_gb_s", "read_gb_s", "matmul_fp32_gflop_s", "matmul_bf16_gflop_s", "env"} <= set(result)
    assert result["read_gb_s"] > 0


def test_generate_measures_the_path_the_api_runs(capsys):
    """The bench prepares its model exactly as kosmos2.api.Kosmos2 does (packed weights, kernels, fused layers)."""
    from kosmos2.cpu import extension

    result = run(capsys, "generate", "--preset", "tiny", "--dtype", "bf16", "--new-tokens", "4", "--repeats", "1")
    assert result["linear_path"] == expected_cpu_path(torch.bfloat16) and 0 < result["generated_tokens"] <= 4
    assert result["attention"] == ("cpu" if extension.available() else "sdpa")
    assert result["fused_decode_layers"] == (load_preset("tiny").decoder_layers if result["linear_path"] == "bf16-vnni"
                                             else 0)
