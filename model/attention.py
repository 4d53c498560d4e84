"""Attention for the space-time U-Net (paper section 3): factorised spatial and temporal
self-attention, a T5-style relative position bias over frame offsets, cross-attention to caption
tokens, and attention pooling of the caption into a vector.

All attention goes through `torch.nn.functional.scaled_dot_product_attention`, so a fused kernel is
used where the device has one. Frame masking for joint image+video training lives here: the
temporal mask lets video frames see video frames and each image frame see only itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from model.blocks import FrameGroupNorm, FramePositionEmbedding, zero_module


def num_heads(channels: int, head_dim: int) -> int:
    """channels // head_dim, at least 1, and adjusted down so the heads split channels exactly."""
    h = max(1, channels // max(1, head_dim))
    while channels % h:
        h -= 1
    return h


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32, max_distance: int = 64) -> torch.Tensor:
    """T5's bidirectional bucketing of (key - query) offsets.

    Half the buckets hold each sign; within a sign, small offsets get a bucket each and larger ones
    share logarithmically wider buckets up to `max_distance`, beyond which everything falls in the
    last bucket. A model trained on 16 frames therefore still has a bias for longer clips.
    """
    num_buckets //= 2
    ret = (relative_position > 0).long() * num_buckets
    n = relative_position.abs()
    max_exact = max(1, num_buckets // 2)
    is_small = n < max_exact
    # clamp(min=1) only avoids log(0) on entries that is_small selects away anyway
    large = max_exact + (
        torch.log(n.float().clamp(min=1) / max_exact)
        / math.log(max(max_distance / max_exact, 1.0 + 1e-6))
        * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return ret + torch.where(is_small, n, large)


class RelativePositionBias(nn.Module):
    """Learned per-head additive bias for temporal attention, indexed by frame-offset bucket; with
    `value_dim`, also a learned vector per head and bucket that is added to the attended values
    (Shaw et al. 2018, the relative position representations the paper's temporal attention cites).

    Why the values matter: a bias only reweights which frames are attended; the attended content
    then carries no trace of *when* it was seen, so an output that should say "the shape was here one
    frame ago, there one frame later" (the sign of motion) has to be pieced together from sharply
    one-sided attention heads. With value embeddings the output of frame i includes
    sum_j a_ij r(j - i): the weighted time offset of the frames whose content matched, which next
    to its spatial neighbours reads directly as the direction of motion. See docs/model.md
    ("Relative position values") for the ablation that found this.
    """

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 64, value_dim: int = 0):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, heads)
        self.values = nn.Embedding(num_buckets, heads * value_dim) if value_dim else None
        self.heads = heads

    def buckets(self, frames: int) -> torch.Tensor:
        pos = torch.arange(frames, device=self.embedding.weight.device)
        return relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)

    def forward(self, frames: int) -> torch.Tensor:
        """-> [heads, frames, frames]; entry (h, i, j) is the bias of query frame i on key frame j."""
        return self.embedding(self.buckets(frames)).permute(2, 0, 1)

    def value_embeddings(self, frames: int) -> torch.Tensor | None:
        """-> [heads, frames, frames, value_dim]: r(j - i) added to key frame j's value for query frame i."""
        if self.values is None:
            return None
        rel = self.values(self.buckets(frames))  # [F, F, heads * d]
        return rearrange(rel, "i j (h d) -> h i j d", h=self.heads)


def attention_with_relative_values(q, k, v, bias: torch.Tensor, rel_values: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) (v + r): attention over [N, heads, S, d] whose values get a
    per-(query, key) relative embedding r [heads, S, S, d]. Written out (SDPA has no such term);
    temporal attention has S = frames (<= a few dozen), so the [N, heads, S, S] weights are small."""
    logits = torch.einsum("nhid,nhjd->nhij", q, k) * q.shape[-1] ** -0.5 + bias
    weights = logits.float().softmax(dim=-1).to(q.dtype)
    return weights @ v + torch.einsum("nhij,hijd->nhid", weights, rel_values.to(q.dtype))


def temporal_attention_mask(frames: int, num_video_frames: int | None, device=None) -> torch.Tensor | None:
    """Boolean [frames, frames] mask (True = may attend) for joint image+video training.

    Frames [0, num_video_frames) form one video and attend to each other; every later frame is an
    independent image and attends only to itself. None when all frames are video (no masking).
    """
    if num_video_frames is None or num_video_frames >= frames:
        return None
    idx = torch.arange(frames, device=device)
    is_video = idx < num_video_frames
    return (is_video[:, None] & is_video[None, :]) | (idx[:, None] == idx[None, :])


QUERY_POSITION_FEATURES = 32  # sinusoidal features of the frame index behind the cross-attention's query position


# CUDA's fused SDPA kernels put the batch on a grid axis limited to 65535 blocks
# (pytorch/pytorch#146704, #142228). Temporal attention's batch is B*H*W: 16 clips with attention
# at 64x64 px would already be 65536, so big batches are split rather than crash.
MAX_SDPA_BATCH = 32768


def chunked_sdpa(q, k, v, attn_mask=None, max_batch: int = MAX_SDPA_BATCH) -> torch.Tensor:
    """scaled_dot_product_attention over [N, heads, S, d], split along N when N > max_batch."""
    n = q.shape[0]
    if n <= max_batch:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    outs = []
    for start in range(0, n, max_batch):
        sl = slice(start, start + max_batch)
        mask = attn_mask if attn_mask is None or attn_mask.shape[0] == 1 else attn_mask[sl]
        outs.append(F.scaled_dot_product_attention(q[sl], k[sl], v[sl], attn_mask=mask))
    return torch.cat(outs, dim=0)


class MultiHeadAttention(nn.Module):
    """Plain multi-head attention on [N, S, C] sequences; keys/values from `context` when given."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * dim, bias=False)
        self.to_out = zero_module(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, attn_mask=None,
                rel_values: torch.Tensor | None = None) -> torch.Tensor:
        """rel_values [heads, S, S, d]: relative value embeddings (then attn_mask must be a float bias)."""
        q = rearrange(self.to_q(x), "n s (h d) -> n h s d", h=self.heads)
        k, v = rearrange(self.to_kv(x if context is None else context), "n s (two h d) -> two n h s d",
                         two=2, h=self.heads)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)  # SDPA wants a float mask in the query's dtype
        if rel_values is not None:
            out = attention_with_relative_values(q, k, v, attn_mask, rel_values)
        else:
            out = chunked_sdpa(q, k, v, attn_mask=attn_mask)
        return self.to_out(rearrange(out, "n h s d -> n s (h d)"))


class SpaceTimeAttention(nn.Module):
    """Spatial self-attention, then temporal self-attention, then (optionally) cross-attention to
    the caption tokens; each pre-normed (per frame) and residual.

    Factorising space and time keeps the cost at F*(HW)^2 + HW*F^2 instead of (F*HW)^2, and lets the
    same block run on single images (F=1), where the temporal step reduces to a per-frame map.

    With `frame_position_queries` the cross-attention's queries carry an embedding of the frame index
    (model.frame_text_attention="cross"): every other part of the block is per frame or relative in
    time, so without it frame 0 and frame 7 read the caption alike and "moving left" cannot put the
    shape at a different place in each frame (docs/motion.md, "A general network").
    """

    def __init__(self, ch: int, head_dim: int, groups: int, context_dim: int | None,
                 rel_pos_buckets: int = 32, rel_pos_max_distance: int = 64, rel_pos_values: bool = False,
                 frame_position_queries: bool = False):
        super().__init__()
        heads = num_heads(ch, head_dim)
        self.norm_space = FrameGroupNorm(ch, groups)
        self.attn_space = MultiHeadAttention(ch, heads)
        self.norm_time = FrameGroupNorm(ch, groups)
        self.attn_time = MultiHeadAttention(ch, heads)
        self.rel_pos = RelativePositionBias(heads, rel_pos_buckets, rel_pos_max_distance,
                                            value_dim=ch // heads if rel_pos_values else 0)
        if context_dim is not None:
            self.norm_cross = FrameGroupNorm(ch, groups)
            self.attn_cross = MultiHeadAttention(ch, heads, context_dim=context_dim)
        else:
            self.norm_cross = self.attn_cross = None
        self.query_position = (FramePositionEmbedding(QUERY_POSITION_FEATURES, ch)
                               if frame_position_queries and context_dim is not None else None)

    def _query_position(self, x: torch.Tensor, frames: int, num_video_frames: int | None) -> torch.Tensor | None:
        """[(B F), 1, C] frame-index embedding for the cross-attention queries (zero on image frames), or
        None when the option is off or there is no time axis."""
        nv = frames if num_video_frames is None else num_video_frames
        if self.query_position is None or nv < 2:
            return None
        pos = self.query_position(nv, device=x.device).to(x.dtype)
        if nv < frames:
            pos = torch.cat([pos, pos.new_zeros(frames - nv, pos.shape[1])])
        return pos.repeat(x.shape[0] // frames, 1)[:, None, :]

    def forward(self, x: torch.Tensor, frames: int, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None,
                num_video_frames: int | None = None) -> torch.Tensor:
        """x [(B F), C, H, W] (frames folded into the batch, F = `frames`); context [B, L, Dc] with
        context_mask [B, L] (True = real token); frame_mask [F, F] bool from
        `temporal_attention_mask` (None = all frames are one video); num_video_frames as in the U-Net."""
        f = frames
        h, w = x.shape[2:]

        y = rearrange(self.norm_space(x), "n c h w -> n (h w) c")
        y = self.attn_space(y)
        x = x + rearrange(y, "n (h w) c -> n c h w", h=h)

        bias = self.rel_pos(f)  # [heads, F, F]
        if frame_mask is not None:
            bias = bias.masked_fill(~frame_mask, float("-inf"))
        y = rearrange(self.norm_time(x), "(b f) c h w -> (b h w) f c", f=f)
        y = self.attn_time(y, attn_mask=bias[None], rel_values=self.rel_pos.value_embeddings(f))
        x = x + rearrange(y, "(b h w) f c -> (b f) c h w", f=f, h=h, w=w)

        if self.attn_cross is not None and context is not None:
            ctx = context.repeat_interleave(f, dim=0)  # [(b f), L, Dc]
            mask = None if context_mask is None else context_mask.repeat_interleave(f, dim=0)[:, None, None, :]
            y = rearrange(self.norm_cross(x), "n c h w -> n (h w) c")
            pos = self._query_position(x, f, num_video_frames)
            if pos is not None:
                y = y + pos  # only the queries: keys and values come from the caption
            y = self.attn_cross(y, context=ctx, attn_mask=mask)
            x = x + rearrange(y, "n (h w) c -> n c h w", h=h)
        return x


class AttentionPool(nn.Module):
    """Caption tokens [B, L, D] + mask -> one vector [B, out_dim]: a learned query attends over the
    real tokens (the paper's attention pooling of BERT embeddings)."""

    def __init__(self, in_dim: int, out_dim: int, head_dim: int = 64):
        super().__init__()
        self.heads = num_heads(out_dim, head_dim)
        self.query = nn.Parameter(torch.randn(1, 1, out_dim) * out_dim**-0.5)
        self.to_kv = nn.Linear(in_dim, 2 * out_dim, bias=False)
        self.to_out = nn.Linear(out_dim, out_dim)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        k, v = rearrange(self.to_kv(tokens), "b s (two h d) -> two b h s d", two=2, h=self.heads)
        q = rearrange(self.query.expand(b, -1, -1).to(k.dtype), "b s (h d) -> b h s d", h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.to_out(rearrange(out, "b h s d -> b (s h d)"))
