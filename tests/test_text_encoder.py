"""Caption embeddings: the same module makes shard embeddings and sampling-time prompt embeddings."""

import numpy as np
import pytest
import torch

from model.text_encoder import MINILM_ALIAS, TextEncoder


def test_tiny_bert_unpadded_float16(tiny_bert_dir):
    enc = TextEncoder(tiny_bert_dir)
    short, long = enc.encode(["dog", "a red square moving left fast"])
    assert short.dtype == np.float16 and short.shape[1] == enc.dim == 32
    assert short.shape[0] < long.shape[0]  # padding removed: true token counts differ
    emb, mask = enc.encode_padded(["dog", "a red square moving left fast"])
    assert mask.sum(1).tolist() == [short.shape[0], long.shape[0]]
    # Unpadded rows equal the padded batch's valid tokens (up to float16 rounding).
    np.testing.assert_allclose(short, emb[0, : short.shape[0]].numpy(), atol=2e-3, rtol=1e-2)
    assert torch.all(emb[0, short.shape[0]:] == 0)


def test_max_length_truncates(tiny_bert_dir):
    enc = TextEncoder(tiny_bert_dir, max_length=5)
    (e,) = enc.encode(["a red square moving left fast over the city at night"])
    assert e.shape[0] == 5


def test_real_offline_minilm_distinguishes_captions():
    enc = TextEncoder(MINILM_ALIAS)
    a, b, c = enc.encode_padded(["a red square moving right", "a red square moving right",
                                 "fireworks over a city at night"])[0]
    assert enc.dim == 384
    assert torch.allclose(a, b) and not torch.allclose(a[:3], c[:3])


def test_unknown_encoder_error_names_it(tmp_path):
    with pytest.raises(OSError, match="no-such-encoder"):
        TextEncoder(str(tmp_path / "no-such-encoder"))
    with pytest.raises(ValueError, match="int8"):
        TextEncoder(MINILM_ALIAS, dtype="int8")
