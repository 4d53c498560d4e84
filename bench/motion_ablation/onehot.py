""""""

import torch

import trainer.generate as gen
import trainer.loop as loop
from data_pipeline.synthetic import COLOURS, DIRECTIONS, SHAPES
from data_pipeline.synthetic_reader import parse_caption


def apply() -> None:
    def onehot(captions):
        emb = torch.zeros(len(captions), 3, 384)
        for i, c in enumerate(captions):
            t = parse_caption(c)
            emb[i, 0, list(COLOURS).index(t["colour"])] = 1
            emb[i, 1, 10 + list(SHAPES).index(t["shape"])] = 1
            emb[i, 2, 20 + list(DIRECTIONS).index(t["direction"])] = 1
        return emb * 5, torch.ones(len(captions), 3, dtype=torch.bool)

    _orig_cond = loop.Trainer._cond

    def _cond(self, batch, drop_captions):
        e, m = onehot(batch["captions"])
        return _orig_cond(self, dict(batch, text_emb=e, text_mask=m), drop_captions)

    loop.Trainer._cond = _cond
    gen.encode_prompts = lambda enc, prompts: onehot(prompts)
