"""A tiny random BERT with a real WordPiece vocabulary, built offline (tests and benchmarks only).

There is no model hub on our machines, so code that must load "a BERT by path" is exercised with
this one; production uses bert-large-uncased, the demo the MiniLM encoder shipped on PyPI.
"""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_bert(directory: str | Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> str:
    """Build and save a tiny random BERT with a real WordPiece vocab (tests; no hub access)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = ("a the red green blue yellow square circle triangle moving left right up down fast slow "
             "dog cat car city night beach fireworks over on in of and ball bouncing small big").split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words)) + list("abcdefghijklmnopqrstuvwxyz")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=2, intermediate_size=hidden_size * 2, max_position_embeddings=128)
    BertModel(config).save_pretrained(directory)
    return str(directory)
