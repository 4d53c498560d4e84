"""Text → video with a trained model: prompt embedding, CFG sampling, optional extension.

Shared by the periodic TensorBoard samples in the training loop and by the `trainer.sample` CLI, so
what you see during training is exactly what the CLI produces for the same weights and seed.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from model.config import SamplingConfig
from model.diffusion import GaussianDiffusion
from model.sampling import extend, sample


def encode_prompts(encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 [B, L, D], bool [B, L]), rounded through float16 like the embeddings stored in shards."""
    emb, mask = encoder.encode_padded(list(prompts))
    return emb.to(torch.float16).to(torch.float32), mask


def load_text_encoder(name: str, max_length: int):
    """The text encoder for prompts on CPU in fp32; max_length: the run's data.max_text_len."""
    from model.text_encoder import TextEncoder

    return TextEncoder(name, device="cpu", dtype="fp32", max_length=max_length)


def null_text_branch(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CFG's unconditional branch as zero tokens with an all-False mask, shaped like the caption.

    SpaceTimeUNet gives a row without a real token the null-caption conditioning of text_emb=None
    (tests/test_cfg_batched.py checks this), but unlike None this branch has the caption's shapes, so
    the sampler can run both branches in one batched call (model.sampling.merge_cfg_batch).
    """
    return {"text_emb": torch.zeros_like(cond["text_emb"]), "text_mask": torch.zeros_like(cond["text_mask"])}


@contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode for sampling, back in its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def sampling_setup(model: nn.Module, sc: SamplingConfig, text_emb: torch.Tensor | None, text_mask: torch.Tensor | None,
                   device: torch.device, cfg_batched: bool | None = None) -> tuple:
    """(denoiser, keywords of `model.sampling.sample` but the generator) for `model` with captions
    text_emb/text_mask (None: no caption; the model's null branch, and no classifier-free guidance,
    which would compare the null branch with itself). cfg_batched: see `generate`."""
    def denoiser(z, logsnr, **c):
        return model(z, logsnr, **c).float()

    kwargs = dict(sc.sample_kwargs(), device=device)
    if text_emb is None:
        return denoiser, dict(kwargs, guidance_weight=0.0, cond={}, uncond={})
    cond = {"text_emb": text_emb.to(device), "text_mask": text_mask.to(device)}
    if cfg_batched is None:
        cfg_batched = device.type == "cuda"
    # text None cannot be merged with the caption's tensors, so the sampler makes two calls
    uncond = null_text_branch(cond) if cfg_batched else {"text_emb": None, "text_mask": None}
    return denoiser, dict(kwargs, cond=cond, uncond=uncond)


@torch.no_grad()
def generate(model: nn.Module, diffusion: GaussianDiffusion, text_emb: torch.Tensor, text_mask: torch.Tensor, *,
             frames: int, height: int, width: int, channels: int = 3, sampling: SamplingConfig | None = None,
             sampler: str | None = None, steps: int | None = None, gamma: float | None = None,
             langevin_delta: float | None = None, guidance_weight: float | None = None, clip_x: bool | None = None,
             reconstruction_weight: float | None = None, seed: int = 0, extend_to: int | None = None,
             device: torch.device | str = "cpu", cfg_batched: bool | None = None) -> torch.Tensor:
    """Videos [B, C, T, H, W] in [-1, 1], one per prompt row; deterministic for a given seed.

    Sampler settings come from `sampling` (the run's `sampling:` section; default `SamplingConfig()`),
    and an explicit keyword (sampler, steps, gamma, langevin_delta, guidance_weight, clip_x,
    reconstruction_weight) that is not None overrides its field: the config is the one source of defaults,
    this function defines none. Unlike `model.sampling.sample`, the config's `clip_x` policy (on)
    applies here, because these are videos for people to watch.

    extend_to > frames samples longer videos window by window with reconstruction guidance (paper
    section 3.1) on the frames generated so far. cfg_batched: run guidance's two branches as one
    batched call (True) or two calls (False); None = batched on CUDA, two calls elsewhere, because on
    CPU the doubled batch measured 0.77x the speed of two calls (BENCHMARKS.md). Same samples either way.
    """
    sc = (sampling or SamplingConfig()).with_overrides(
        sampler=sampler, steps=steps, gamma=gamma, langevin_delta=langevin_delta, guidance_weight=guidance_weight,
        clip_x=clip_x, reconstruction_weight=reconstruction_weight)
    device = torch.device(device)
    denoiser, kwargs = sampling_setup(model, sc, text_emb, text_mask, device, cfg_batched)
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (text_emb.shape[0], channels, frames, height, width)
    with eval_mode(model):
        if extend_to is not None and extend_to > frames:
            out = extend(denoiser, diffusion, shape, extend_to, guidance="reconstruction",
                         reconstruction_weight=sc.reconstruction_weight, generator=generator, **kwargs)
        else:
            out = sample(denoiser, diffusion, shape, generator=generator, **kwargs)
    return out.clamp(-1, 1)
