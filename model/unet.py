"""SpaceTimeUNet: the space-time factorised 3D U-Net of "Video Diffusion Models" (paper section 3).

A DDPM-style image U-Net where every 2D conv is a 1x3x3 3D conv, down/upsampling happen in space
only, and each attention resolution gets spatial attention, temporal attention (with a relative
position bias over frame offsets) and optional cross-attention to caption tokens. Conditioning on
the noise level (log-SNR) and the pooled caption goes into every residual block by FiLM.

The model knows nothing about how it is parallelised: strategies wrap the modules returned by
`SpaceTimeUNet.blocks()` one by one (FSDP2 `fully_shard`, DeepSpeed, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from model.attention import AttentionPool, SpaceTimeAttention, temporal_attention_mask
from model.blocks import (
    Downsample,
    FrameGroupNorm,
    FramePositionEmbedding,
    LogSNREmbedding,
    ResBlock,
    TemporalConv,
    Upsample,
    space_conv,
    zero_module,
)
from model.config import UNetConfig
from model.motion import MotionConditioning

aten = torch.ops.aten
# The ops whose outputs the `selective` checkpoint policy keeps: the matmuls, convolutions and fused
# attention kernels hold nearly all of a block's FLOPs, so recomputing only what lies between them
# (norms, SiLU, FiLM, residual adds, softmax of the written-out attention) costs a few percent of
# the step while the activations between those ops are not stored (torchtitan's "op-level SAC").
SELECTIVE_SAVE_OPS = frozenset({
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.convolution.default,
    aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
})


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint_context():
    """The (forward, recompute) context pair of the `selective` policy (a fresh cache per call)."""
    return create_selective_checkpoint_contexts(_selective_policy)


CHECKPOINT_POLICIES = ("none", "all", "attention", "resblocks", "every_k", "selective")


def validate_config(cfg: UNetConfig) -> None:
    """Fail at build time, with the field's name, on shapes the U-Net cannot realise."""
    levels = len(cfg.channel_mults)
    if levels < 1:
        raise ValueError("model.channel_mults must list at least one level")
    for name in ("in_channels", "out_channels", "base_channels", "head_dim", "cond_dim", "text_dim", "groups"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"model.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_res_blocks < 1:
        raise ValueError(f"model.num_res_blocks must be >= 1, got {cfg.num_res_blocks}")
    if any(m < 1 for m in cfg.channel_mults):
        raise ValueError(f"model.channel_mults must be positive, got {list(cfg.channel_mults)}")
    if cfg.image_size % (2 ** (levels - 1)):
        raise ValueError(
            f"model.image_size={cfg.image_size} must be divisible by 2**(levels-1)={2 ** (levels - 1)} "
            f"for channel_mults={list(cfg.channel_mults)}"
        )
    if cfg.rel_pos_buckets < 2:
        raise ValueError(f"model.rel_pos_buckets must be >= 2, got {cfg.rel_pos_buckets}")
    if cfg.temporal_conv_kernel < 0 or (cfg.temporal_conv_kernel and cfg.temporal_conv_kernel % 2 == 0):
        raise ValueError(f"model.temporal_conv_kernel must be 0 (none) or odd, got {cfg.temporal_conv_kernel}")
    if cfg.frame_text_attention != "none" and not cfg.cross_attention:
        raise ValueError(f"model.frame_text_attention={cfg.frame_text_attention!r} puts the frame position into the "
                         f"text cross-attention: it needs model.cross_attention=true")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.dropout must be in [0, 1), got {cfg.dropout}")


class _Stage(nn.Module):
    """One U-Net step at a fixed resolution: a residual block, a temporal convolution if configured,
    then attention where configured."""

    def __init__(self, res: ResBlock, attn: SpaceTimeAttention | None, tconv: TemporalConv | None = None):
        super().__init__()
        self.res = res
        self.tconv = tconv
        self.attn = attn


def _stage(cfg: UNetConfig, cin: int, cout: int, attend: bool) -> _Stage:
    """A stage from cin to cout channels; its parts are built in the order attention, temporal conv,
    residual block (the order of the random initialisation, kept so seeded models stay the same)."""
    attn = None
    if attend:
        attn = SpaceTimeAttention(cout, cfg.head_dim, cfg.groups, cfg.cond_dim if cfg.cross_attention else None,
                                  cfg.rel_pos_buckets, cfg.rel_pos_max_distance, cfg.rel_pos_values,
                                  frame_position_queries=cfg.frame_text_attention == "cross")
    tconv = TemporalConv(cout, cfg.groups, cfg.temporal_conv_kernel) if cfg.temporal_conv_kernel else None
    return _Stage(ResBlock(cin, cout, cfg.cond_dim, cfg.groups, cfg.dropout), attn, tconv)


def _down_path(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The encoder stages and downsamplings, and the channels of every skip connection they leave
    (the input convolution's first; the last is the channel count the middle gets)."""
    ch0 = cfg.base_channels
    down = nn.ModuleList()
    skip_channels = [ch0]
    ch = ch0
    levels = len(cfg.channel_mults)
    for level, mult in enumerate(cfg.channel_mults):
        side = cfg.image_size // 2**level
        for _ in range(cfg.num_res_blocks):
            down.append(_stage(cfg, ch, ch0 * mult, side in cfg.attention_resolutions))
            ch = ch0 * mult
            skip_channels.append(ch)
        if level != levels - 1:
            down.append(Downsample(ch))
            skip_channels.append(ch)
    return down, skip_channels


def _up_path(cfg: UNetConfig, skip_channels: list[int], ch: int) -> tuple[nn.ModuleList, int]:
    """The decoder stages (each takes one skip connection, last in first out) and upsamplings, from
    `ch` channels; with the channel count they end with."""
    ch0 = cfg.base_channels
    skips = list(skip_channels)
    up = nn.ModuleList()
    for level in reversed(range(len(cfg.channel_mults))):
        side = cfg.image_size // 2**level
        mult = cfg.channel_mults[level]
        for _ in range(cfg.num_res_blocks + 1):
            up.append(_stage(cfg, ch + skips.pop(), ch0 * mult, side in cfg.attention_resolutions))
            ch = ch0 * mult
        if level != 0:
            up.append(Upsample(ch))
    return up, ch


class SpaceTimeUNet(nn.Module):
    """forward(z [B,C,F,H,W], logsnr [B], text_emb [B,L,D] | None, text_mask [B,L] | None,
    num_video_frames) -> prediction [B, out_channels, F, H, W]."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        validate_config(cfg)
        self.cfg = cfg
        self._build_conditioning(cfg)
        self.conv_in = space_conv(cfg.in_channels, cfg.base_channels)
        self.down, skip_channels = _down_path(cfg)
        ch = skip_channels[-1]
        # the middle always has attention (as in DDPM): it is the cheapest place to mix globally
        self.mid = nn.ModuleList([_stage(cfg, ch, ch, attend=True), _stage(cfg, ch, ch, attend=False)])
        self.up, ch = _up_path(cfg, skip_channels, ch)
        self.norm_out = FrameGroupNorm(ch, cfg.groups)
        self.conv_out = zero_module(space_conv(ch, cfg.out_channels))

    def _build_conditioning(self, cfg: UNetConfig) -> None:
        """Conditioning: log-SNR embedding + attention-pooled caption; a learned null token stands
        for "no caption" (classifier-free guidance's unconditional branch)."""
        ch0 = cfg.base_channels
        self.logsnr_embed = LogSNREmbedding(ch0, cfg.cond_dim)
        self.frame_embed = FramePositionEmbedding(ch0, cfg.cond_dim) if cfg.frame_position_embedding else None
        self.motion_cond = (MotionConditioning(cfg.text_dim, cfg.cond_dim, cfg.motion_scale)
                            if cfg.motion_conditioning else None)
        self.null_text = nn.Parameter(torch.randn(1, cfg.text_dim) * 0.02)
        self.text_norm = nn.LayerNorm(cfg.text_dim)
        self.text_pool = AttentionPool(cfg.text_dim, cfg.cond_dim, cfg.head_dim)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.cond_dim) if cfg.cross_attention else None

    # ------------------------------------------------------------------ for parallelism strategies
    def blocks(self) -> list[nn.Module]:
        """The residual and attention blocks, in forward order: the units a strategy shards
        (FSDP2 `fully_shard` per block) and the units of gradient checkpointing."""
        return [m for m in self.modules() if isinstance(m, (ResBlock, TemporalConv, SpaceTimeAttention))]

    # ------------------------------------------------------------------ forward
    def checkpointed_blocks(self, policy: str | None = None) -> list[nn.Module]:
        """The blocks `policy` (default: the config's) recomputes in backward, in forward order.

        `every_k` takes blocks 0, k, 2k, ... of `blocks()`: spread over every resolution, so the
        memory saved is spread too (the activations of the high-resolution blocks are the big ones).
        """
        policy = policy or self.cfg.activation_checkpointing
        blocks = self.blocks()
        if policy in ("all", "selective"):
            return blocks
        if policy == "attention":
            return [b for b in blocks if isinstance(b, SpaceTimeAttention)]
        if policy == "resblocks":
            return [b for b in blocks if isinstance(b, ResBlock)]
        if policy == "every_k":
            return blocks[:: self.cfg.checkpoint_every_k]
        if policy == "none":
            return []
        raise ValueError(f"model.checkpoint_policy {policy!r} is not one of {list(CHECKPOINT_POLICIES)}")

    def _run(self, block: nn.Module, *args):
        policy = self.cfg.activation_checkpointing
        if policy == "none" or not self.training or not torch.is_grad_enabled():
            return block(*args)
        # which blocks: cached per policy (blocks() walks the module tree; a policy edited on the
        # config after construction is still honoured because the key includes it)
        key = (policy, self.cfg.checkpoint_every_k)
        if getattr(self, "_ckpt_key", None) != key:
            self._ckpt_ids = frozenset(id(b) for b in self.checkpointed_blocks(policy))
            self._ckpt_key = key
        if id(block) not in self._ckpt_ids:
            return block(*args)
        if policy == "selective":
            return checkpoint(block, *args, use_reentrant=False, context_fn=selective_checkpoint_context)
        return checkpoint(block, *args, use_reentrant=False)

    def _stage(self, stage: _Stage, h, cond, frames, context, context_mask, frame_mask, num_video_frames):
        h = self._run(stage.res, h, cond)
        if stage.tconv is not None:
            h = self._run(stage.tconv, h, frames, num_video_frames)
        if stage.attn is not None:
            h = self._run(stage.attn, h, frames, context, context_mask, frame_mask, num_video_frames)
        return h

    def encode_text(self, text_emb: torch.Tensor | None, text_mask: torch.Tensor | None, batch: int):
        """-> (pooled [B, cond_dim], context [B, L', cond_dim] | None, context_mask [B, L'] bool).

        The null token is appended to every caption and unmasked only in rows without a real token,
        so a dropped caption (all-False mask) and text_emb=None give the same conditioning.
        """
        d = self.cfg.text_dim
        null = self.null_text[None].expand(batch, 1, d)
        if text_emb is None:
            tokens = null
            mask = torch.ones(batch, 1, dtype=torch.bool, device=null.device)
        else:
            if text_emb.ndim != 3 or text_emb.shape[0] != batch or text_emb.shape[2] != d:
                raise ValueError(f"text_emb must be [B={batch}, L, D={d}], got {list(text_emb.shape)}")
            if text_mask is None:
                text_mask = torch.ones(text_emb.shape[:2], dtype=torch.bool, device=text_emb.device)
            if text_mask.shape != text_emb.shape[:2]:
                raise ValueError(f"text_mask must be {list(text_emb.shape[:2])}, got {list(text_mask.shape)}")
            text_mask = text_mask.bool()
            dropped = ~text_mask.any(dim=1, keepdim=True)
            tokens = torch.cat([text_emb.to(null.dtype), null], dim=1)
            mask = torch.cat([text_mask, dropped], dim=1)
        tokens = self.text_norm(tokens)
        pooled = self.text_pool(tokens, mask)
        context = self.text_proj(tokens) if self.text_proj is not None else None
        return pooled, context, mask

    def per_frame_cond(self, cond: torch.Tensor, frames: int, num_video_frames: int | None,
                       extra: torch.Tensor | None = None) -> torch.Tensor:
        """[B, cond_dim] -> [(B F), cond_dim]: each video frame's conditioning plus its position (and
        `extra` [B, nv, cond_dim], the motion term); image frames (beyond num_video_frames) and a lone
        frame (no time axis) keep the plain one."""
        nv = frames if num_video_frames is None else num_video_frames
        if nv < 2:
            return cond.repeat_interleave(frames, dim=0)
        pos = cond.new_zeros(1, nv, cond.shape[1])
        if self.frame_embed is not None:
            pos = pos + self.frame_embed(nv, device=cond.device).to(cond.dtype)[None]
        if extra is not None:
            pos = pos + extra.to(cond.dtype)
        pos = pos.expand(cond.shape[0], -1, -1)
        if nv < frames:
            pos = torch.cat([pos, pos.new_zeros(pos.shape[0], frames - nv, pos.shape[2])], dim=1)
        return (cond[:, None, :] + pos).flatten(0, 1)

    def motion_term(self, text_emb: torch.Tensor | None, text_mask: torch.Tensor | None,
                    motion: torch.Tensor | None, video_frames: int) -> tuple[torch.Tensor | None, dict]:
        """([B, nv, cond_dim] motion x frame-position term, auxiliary losses): (None, {}) without motion
        conditioning, a time axis or a caption. `motion` [B, 4] (the clip's measured global motion) in
        training, where the head's regression on it is returned as "motion_loss"; None at sampling,
        where the caption's predicted motion is used."""
        if self.motion_cond is None or video_frames < 2 or text_emb is None:
            return None, {}
        mask = (text_mask.bool() if text_mask is not None
                else torch.ones(text_emb.shape[:2], dtype=torch.bool, device=text_emb.device))
        captioned = mask.any(dim=1)
        predicted = self.motion_cond.predict(text_emb, mask)
        aux = {} if motion is None else {"motion_loss": self.motion_cond.regression_loss(predicted, motion, captioned)}
        return self.motion_cond(self.motion_cond.motion(predicted, motion, captioned), video_frames), aux

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, text_emb: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, num_video_frames: int | None = None,
                motion: torch.Tensor | None = None, return_aux_losses: bool = False):
        """-> the prediction [B, C, F, H, W]; with `return_aux_losses`, (prediction, {name: scalar loss})
        for the trainer to add with its weights (model.conditioning.aux_loss_weights): the losses of
        the model's own heads, which the strategies carry through forward and backward like the output."""
        cfg = self.cfg
        if z.ndim != 5 or z.shape[1] != cfg.in_channels:
            raise ValueError(f"z must be [B, C={cfg.in_channels}, F, H, W], got {list(z.shape)}")
        b, _, f, h, w = z.shape
        factor = 2 ** (len(cfg.channel_mults) - 1)
        if h % factor or w % factor:
            raise ValueError(f"H, W = {h}, {w} must be divisible by {factor} (the U-Net's downsampling)")
        if num_video_frames is not None and not 0 <= num_video_frames <= f:
            raise ValueError(f"num_video_frames={num_video_frames} must be in [0, F={f}]")
        logsnr = torch.as_tensor(logsnr, device=z.device)
        if logsnr.ndim == 0:
            logsnr = logsnr.expand(b)
        if logsnr.shape != (b,):
            raise ValueError(f"logsnr must be [B={b}], got {list(logsnr.shape)}")

        pooled, context, context_mask = self.encode_text(text_emb, text_mask, b)
        cond = self.logsnr_embed(logsnr) + pooled
        video_frames = f if num_video_frames is None else num_video_frames
        extra, aux_losses = self.motion_term(text_emb, text_mask, motion, video_frames)
        if self.frame_embed is not None or extra is not None:
            cond = self.per_frame_cond(cond, f, num_video_frames, extra)
        frame_mask = temporal_attention_mask(f, num_video_frames, device=z.device)
        args = (cond, f, context, context_mask, frame_mask, num_video_frames)

        # frames folded into the batch: convs and norms are per frame by construction
        hid = self.conv_in(rearrange(z, "b c f h w -> (b f) c h w"))
        skips = [hid]
        for layer in self.down:
            hid = layer(hid) if isinstance(layer, Downsample) else self._stage(layer, hid, *args)
            skips.append(hid)
        for stage in self.mid:
            hid = self._stage(stage, hid, *args)
        for layer in self.up:
            if isinstance(layer, Upsample):
                hid = layer(hid)
            else:
                hid = self._stage(layer, torch.cat([hid, skips.pop().to(hid.dtype)], dim=1), *args)
        out = self.conv_out(F.silu(self.norm_out(hid)))
        # a fresh tensor, not a view: FSDP2 hooks the root's output for backward, and an in-place op
        # by the caller on a view would silently bypass that hook
        out = rearrange(out, "(b f) c h w -> b c f h w", b=b).clone(memory_format=torch.contiguous_format)
        return (out, aux_losses) if return_aux_losses else out


def count_parameters(model: nn.Module) -> int:
    """Total parameter count (works on meta-device models: only shapes are read)."""
    return sum(p.numel() for p in model.parameters())
