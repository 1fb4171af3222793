"""The sin-cos initialisation of the <patch_index_*> embeddings (kosmos2/model/location_embeddings.py), checked against
hand-computed values, and its wiring: the tiny preset asks for it, xl keeps the official normal init, the fairseq
model applies it to exactly the tokenizer's location rows."""
import math

import pytest
import torch

from kosmos2.config import load_preset
from kosmos2.model.location_embeddings import init_location_embeddings, sincos_2d_bins


def test_code_of_one_bin_by_hand():
    # 4 bins per side, width 8: per axis 2 frequencies 16^(-0/2) = 1 and 16^(-1/2) = 0.25 (max period 4 * bins)
    # bin 6 = row 1, column 2; channels: sin/cos of the column, then sin/cos of the row; total norm sqrt(4) = 2
    expected = torch.tensor([math.sin(2), math.sin(0.5), math.cos(2), math.cos(0.5),
                             math.sin(1), math.sin(0.25), math.cos(1), math.cos(0.25)]) / 2
    assert torch.allclose(sincos_2d_bins(4, 8)[6], expected, atol=1e-6)


def test_neighbouring_bins_are_more_alike_than_distant_ones():
    code = sincos_2d_bins(32, 256)
    assert torch.allclose(code.norm(dim=1), torch.ones(1024), atol=1e-5)
    at = lambda row, col: code[row * 32 + col]
    along_row = [float(at(10, 10) @ at(10, 10 + d)) for d in range(6)]
    along_col = [float(at(10, 10) @ at(10 + d, 10)) for d in range(6)]
    assert along_row == sorted(along_row, reverse=True) and along_col == sorted(along_col, reverse=True)
    assert float(at(0, 0) @ at(31, 31)) < along_row[3]


def test_only_the_location_rows_change_and_keep_their_scale():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(30, 16)
    torch.nn.init.normal_(emb.weight, std=16 ** -0.5)
    before = emb.weight.detach().clone()
    init_location_embeddings(emb, first_id=10, bins=4)
    after = emb.weight.detach()
    assert torch.equal(after[:10], before[:10]) and torch.equal(after[26:], before[26:])
    assert torch.allclose(after[10:26], sincos_2d_bins(4, 16) * before[10:26].norm(dim=1).mean(), atol=1e-6)
    init_location_embeddings(emb, first_id=10, bins=4, kind="normal")  # the official init: nothing to do
    assert torch.equal(emb.weight.detach(), after)
    with pytest.raises(ValueError, match="do not fit"):
        init_location_embeddings(emb, first_id=20, bins=4)
    with pytest.raises(ValueError, match="must be one of"):
        init_location_embeddings(emb, first_id=10, bins=4, kind="xavier")


def test_presets_choose_their_init():
    assert load_preset("tiny").location_embedding_init == "sincos2d"
    assert load_preset("xl").location_embedding_init == "normal"
    with pytest.raises(ValueError, match="location_embedding_init"):
        load_preset("tiny", location_embedding_init="random")
