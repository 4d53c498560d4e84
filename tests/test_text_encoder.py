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
    a, c = enc.encode_padded(["a red square moving right", "fireworks over a city at night"])[0]
    assert enc.dim == 384
    assert not torch.allclose(a[:3], c[:3])


CAPTIONS = ["dog", "a red square moving left fast", "a blue circle bouncing over the city at night",
            "cat"]


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_embeddings_equal_transformers_called_directly(which, request):
    """Each caption alone (no padding, no batch) through transformers' own tokenizer and model gives
    the last hidden state of every token, [CLS] and [SEP] included: the shard format's rows. Catches a
    padded batch leaking into the short captions, another layer, a lost token or a dropped max_length."""
    from transformers import AutoModel, AutoTokenizer

    from model.text_encoder import resolve_encoder_path

    name = request.getfixturevalue("tiny_bert_dir") if which == "tiny" else MINILM_ALIAS
    path = resolve_encoder_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    for max_length in (77, 6):
        enc = TextEncoder(name, max_length=max_length)
        got = enc.encode(CAPTIONS)
        for caption, emb in zip(CAPTIONS, got):
            tok = tokenizer(caption, truncation=True, max_length=max_length, return_tensors="pt")
            with torch.no_grad():
                want = model(**tok).last_hidden_state[0]
            assert emb.shape == tuple(want.shape), (caption, max_length)
            # float16 storage: within its rounding of the fp32 reference
            np.testing.assert_allclose(emb.astype(np.float32), want.numpy(), rtol=2e-3, atol=2e-3)


def test_unknown_encoder_error_names_it(tmp_path):
    with pytest.raises(OSError, match="no-such-encoder"):
        TextEncoder(str(tmp_path / "no-such-encoder"))
    with pytest.raises(ValueError, match="int8"):
        TextEncoder(MINILM_ALIAS, dtype="int8")
