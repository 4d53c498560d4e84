"""caption factor(s) x frame position in each frame's conditioning: cond_t = cond + sum_k s_k(caption) P_k(t)

LSIGN_SRC=dir    : f = the one-hot direction dims (needs onehot)
LSIGN_SRC=all    : f = the whole flattened one-hot caption
LSIGN_SRC=tokmean: f = masked mean of layer-normed caption tokens (MiniLM)
LSIGN_SRC=hand   : s = (right-left, down-up) read by hand from the one-hot tokens (diagnostic, K=2)
LSIGN_K: number of factors; LSIGN_FREEZE=1: the read keeps its random start; LSIGN_NORM: ''|center|bn (batch statistics, also at eval when LSIGN_EVALBATCH)
"""

import os

import torch
from torch import nn

import model.unet as U
from model.blocks import sinusoidal_embedding, zero_module


def apply() -> None:
    SRC = os.environ.get("LSIGN_SRC", "dir")
    KF = int(os.environ.get("LSIGN_K", "1"))
    _init = U.SpaceTimeUNet.__init__

    def __init__(self, cfg):
        _init(self, cfg)
        n = {"dir": 4, "all": 3 * cfg.text_dim, "tokmean": cfg.text_dim, "hand": 4}[SRC]
        self.sign_head = nn.Linear(n, KF)
        G = float(os.environ.get("LSIGN_LRMULT", "1"))
        with torch.no_grad():
            self.sign_head.weight.div_(G)
        if os.environ.get("LSIGN_FREEZE"):  # a fixed random read: only P and the rest of the model learn
            g = torch.Generator().manual_seed(1234)  # the same read in training and in the fresh export model
            with torch.no_grad():
                w = self.sign_head.weight
                w.copy_((torch.rand(w.shape, generator=g) * 2 - 1) / w.shape[1] ** 0.5)
                self.sign_head.bias.zero_()
            self.sign_head.requires_grad_(False)
        self.frame_embed_k = zero_module(nn.Linear(32, KF * cfg.cond_dim))

    _enc = U.SpaceTimeUNet.encode_text

    def encode_text(self, text_emb, text_mask, batch):
        out = _enc(self, text_emb, text_mask, batch)
        if text_emb is None:
            self._sign = None
            return out
        tm = (
            text_mask.to(text_emb.dtype)
            if text_mask is not None
            else torch.ones(text_emb.shape[:2], dtype=text_emb.dtype, device=text_emb.device)
        )
        present = tm.amax(1) > 0
        if SRC == "hand":
            d = text_emb[:, 2, 20:24] / 5.0
            s = torch.stack([d[:, 1] - d[:, 0], d[:, 3] - d[:, 2]], 1)
        else:
            if SRC == "dir":
                f = text_emb[:, 2, 20:24] * tm[:, 2:3]
            elif SRC == "all":
                f = (text_emb * tm[..., None]).flatten(1)
            else:
                t = torch.nn.functional.layer_norm(text_emb, text_emb.shape[-1:])
                f = (t * tm[..., None]).sum(1) / tm.sum(1, keepdim=True).clamp(min=1)
            s = self.sign_head(f * float(os.environ.get("LSIGN_LRMULT", "1")))
            norm = os.environ.get("LSIGN_NORM", "")
            if norm == "rms":
                s = s * torch.rsqrt(s.pow(2).mean(1, keepdim=True) + 1e-6)
            elif norm and present.sum() > 1 and (self.training or os.environ.get("LSIGN_EVALBATCH")):
                sp = s[present]
                s = (s - sp.mean(0)) / (sp.std(0).clamp(min=1e-3) if norm == "bn" else 1.0)
        self._sign = s * present[:, None].to(s.dtype)
        return out

    def per_frame_cond(self, cond, frames, num_video_frames, extra=None):
        nv = frames if num_video_frames is None else num_video_frames
        if nv < 2:
            return cond.repeat_interleave(frames, dim=0)
        idx = torch.arange(nv, device=cond.device, dtype=torch.float32)
        P = self.frame_embed_k(sinusoidal_embedding(idx, 32, max_period=100.0).to(cond.dtype)).reshape(
            nv, KF, -1
        )
        pos = self.frame_embed(nv, device=cond.device).to(cond.dtype)[None]
        s = getattr(self, "_sign", None)
        if s is not None:
            pos = pos + torch.einsum("bk,fkd->bfd", s, P)
        pos = pos.expand(cond.shape[0], -1, -1)
        if nv < frames:
            pos = torch.cat([pos, pos.new_zeros(pos.shape[0], frames - nv, pos.shape[2])], dim=1)
        return (cond[:, None, :] + pos).flatten(0, 1)

    U.SpaceTimeUNet.__init__ = __init__
    U.SpaceTimeUNet.encode_text = encode_text
    U.SpaceTimeUNet.per_frame_cond = per_frame_cond
