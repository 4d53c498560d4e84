"""Classifier-free guidance in one batched denoiser call (model.sampling.merge_cfg_batch).

The batched path must give the two-call result (rows are independent, so only float rounding may
differ), call the denoiser once per network evaluation instead of twice, and fall back to two calls
wherever the branches cannot be merged. Checked on the closed-form Gaussian denoiser (float64, tight
tolerance) and on a tiny randomly initialised SpaceTimeUNet whose zero-initialised layers are given
random values (a zero output layer would make every comparison pass trivially).
"""

from __future__ import annotations

import pytest
import torch

import model.sampling as sampling
from model.config import UNetConfig
from model.diffusion import GaussianDiffusion
from model.guidance import ReconstructionGuidance, frame_guide
from model.sampling import extend, merge_cfg_batch, pad_cfg_sequences, sample
from model.unet import SpaceTimeUNet
from testing.gaussian_denoiser import GaussianDenoiser
from trainer.generate import generate, null_text_branch

F64 = torch.float64
TEXT_DIM = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def two_calls(monkeypatch):
    """Force today's two-call path (the reference) by making every merge fail."""

    def force():
        monkeypatch.setattr(sampling, "merge_cfg_batch", lambda cond, uncond, batch: None)

    return force


class Counting:
    """Wraps a denoiser; records the batch size of every call."""

    def __init__(self, fn):
        self.fn, self.batches = fn, []

    def __call__(self, z, logsnr, **kw):
        self.batches.append(z.shape[0])
        return self.fn(z, logsnr, **kw)


def tiny_unet(cross_attention: bool = True, seed: int = 0) -> SpaceTimeUNet:
    torch.manual_seed(seed)
    cfg = UNetConfig(in_channels=3, out_channels=3, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                     image_size=8, attention_resolutions=(8, 4), head_dim=8, cond_dim=32, text_dim=TEXT_DIM,
                     groups=4, cross_attention=cross_attention)
    net = SpaceTimeUNet(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # conv_out, attention to_out, norm biases: zero at init
        for p in net.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    assert net.conv_out.weight.abs().max() > 0
    return net


def caption(b: int = 2, length: int = 5, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False  # a padded caption
    return {"text_emb": torch.randn(b, length, TEXT_DIM, generator=g), "text_mask": mask}


# --------------------------------------------------------------------------------------------------
# The U-Net contract the batched uncond branch relies on
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cross_attention", [True, False])
def test_unet_zero_tokens_with_false_mask_equal_text_none(cross_attention):
    net = tiny_unet(cross_attention)
    g = torch.Generator().manual_seed(2)
    z, logsnr = torch.randn(2, 3, 4, 8, 8, generator=g), torch.tensor([-3.0, 2.0])
    cond = caption()
    with torch.no_grad():
        none = net(z, logsnr, None, None)
        zeros = net(z, logsnr, **null_text_branch(cond))
        # any token values under an all-False mask: still the null branch
        junk = net(z, logsnr, cond["text_emb"] * 50, torch.zeros_like(cond["text_mask"]))
        with_text = net(z, logsnr, **cond)
    # equal up to float32 rounding (a sequence of L + 1 tokens against 1: different reduction order)
    assert none.abs().max() > 0.1
    torch.testing.assert_close(zeros, none, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(junk, none, atol=1e-5, rtol=1e-5)
    assert (with_text - none).abs().max() > 1e-2  # the caption does reach the output


# --------------------------------------------------------------------------------------------------
# merge_cfg_batch rules
# --------------------------------------------------------------------------------------------------
def test_merge_concatenates_tensors_and_passes_equal_scalars_once():
    cond = {**caption(), "num_video_frames": 3, "extra": None}
    uncond = {**null_text_branch(cond), "num_video_frames": 3, "extra": None}
    merged = merge_cfg_batch(cond, uncond, 2)
    assert merged is not None and merged.keys() == cond.keys()
    torch.testing.assert_close(merged["text_emb"], torch.cat([cond["text_emb"], uncond["text_emb"]]))
    assert merged["text_mask"].dtype == torch.bool and merged["text_mask"][2:].sum() == 0
    assert merged["num_video_frames"] == 3 and merged["extra"] is None
    assert merge_cfg_batch({}, {}, 2) == {}


@pytest.mark.parametrize(
    "cond,uncond",
    [
        ({"text_emb": torch.zeros(2, 5, 4)}, {"text_emb": None}),  # today's generate(): tensor vs None
        ({"text_emb": torch.zeros(2, 5, 4)}, {}),  # keys differ
        ({"mean": torch.zeros(4)}, {"mean": torch.ones(4)}),  # no batch dim
        ({"x": torch.zeros(2, 3)}, {"x": torch.zeros(2, 4)}),  # other dims differ
        ({"x": torch.zeros(2, 3)}, {"x": torch.zeros(2, 3, dtype=F64)}),  # dtypes differ
        ({"x": torch.zeros(())}, {"x": torch.zeros(())}),  # 0-d
        ({"n": 3}, {"n": 4}),  # unequal scalars
        ({"n": 1}, {"n": True}),  # equal but different types
        ({"ids": [1, 2]}, {"ids": [1, 2]}),  # containers may be per row
        ({"n": None}, {"n": 0}),
    ],
)
def test_merge_refuses_what_it_cannot_batch(cond, uncond):
    assert merge_cfg_batch(cond, uncond, 2) is None


def test_text_sequences_of_different_length_are_padded_with_masked_zeros():
    cond, uncond = caption(length=5), caption(length=3, seed=7)
    c2, u2 = pad_cfg_sequences(cond, uncond)
    assert c2["text_emb"] is cond["text_emb"] and u2["text_emb"].shape == (2, 5, TEXT_DIM)
    assert (u2["text_emb"][:, 3:] == 0).all() and not u2["text_mask"][:, 3:].any()
    torch.testing.assert_close(u2["text_emb"][:, :3], uncond["text_emb"])
    assert torch.equal(u2["text_mask"][:, :3], uncond["text_mask"])
    assert merge_cfg_batch(cond, uncond, 2)["text_emb"].shape == (4, 5, TEXT_DIM)
    # no mask to pad, or a mask that is not boolean: not padded, so not merged
    assert merge_cfg_batch({"text_emb": cond["text_emb"]}, {"text_emb": uncond["text_emb"]}, 2) is None
    assert merge_cfg_batch({**cond, "text_mask": cond["text_mask"].long()},
                           {**uncond, "text_mask": uncond["text_mask"].long()}, 2) is None


# --------------------------------------------------------------------------------------------------
# Closed-form Gaussian denoiser: batched == two calls, one call per evaluation
# --------------------------------------------------------------------------------------------------
MU_C = torch.tensor([0.5, -0.25, 0.0, 0.25], dtype=F64)
MU_U = torch.tensor([0.1, 0.1, -0.2, 0.3], dtype=F64)
COV = 0.2 * torch.eye(4, dtype=F64) + 0.05


def _gauss_sample(den, sampler, n=64, steps=20, **kw):
    with torch.no_grad():
        return sample(den, GaussianDiffusion("v"), (n, 1, 4, 1, 1), steps=steps, sampler=sampler, guidance_weight=2.0,
                      generator=torch.Generator().manual_seed(3), dtype=F64, **kw)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "pc"])
def test_gaussian_batched_cfg_equals_two_calls(two_calls, sampler):
    n, steps = 64, 20
    kw = dict(cond={"mean": MU_C.expand(n, 4)}, uncond={"mean": MU_U.expand(n, 4)})
    evals = steps + (steps - 1 if sampler == "pc" else 0)
    den = Counting(GaussianDenoiser(MU_U, COV, "v"))
    batched = _gauss_sample(den, sampler, n, steps, **kw)
    assert den.batches == [2 * n] * evals  # one call per evaluation, both branches in it
    den_ref = Counting(GaussianDenoiser(MU_U, COV, "v"))
    two_calls()
    ref = _gauss_sample(den_ref, sampler, n, steps, **kw)
    assert den_ref.batches == [n] * (2 * evals)
    torch.testing.assert_close(batched, ref, rtol=1e-10, atol=1e-10)
    # the guidance is not a no-op: the unguided sample differs
    with torch.no_grad():
        plain = sample(GaussianDenoiser(MU_U, COV, "v"), GaussianDiffusion("v"), (n, 1, 4, 1, 1), steps=steps,
                       sampler=sampler, cond=kw["cond"], generator=torch.Generator().manual_seed(3), dtype=F64)
    assert (plain - batched).abs().max() > 0.1


def test_gaussian_fallback_when_uncond_lacks_the_key_gives_the_same_result():
    """uncond={} (the denoiser's own μ_u) cannot be merged with cond={"mean": ...}: two calls per step,
    and the same samples as the merged form that names μ_u explicitly."""
    n = 64
    den = Counting(GaussianDenoiser(MU_U, COV, "v"))
    fallback = _gauss_sample(den, "ancestral", n, cond={"mean": MU_C.expand(n, 4)}, uncond={})
    assert den.batches == [n] * 40
    den2 = Counting(GaussianDenoiser(MU_U, COV, "v"))
    batched = _gauss_sample(den2, "ancestral", n, cond={"mean": MU_C.expand(n, 4)}, uncond={"mean": MU_U.expand(n, 4)})
    assert den2.batches == [2 * n] * 20
    torch.testing.assert_close(batched, fallback, rtol=1e-10, atol=1e-10)


def test_gaussian_batched_cfg_with_reconstruction_guidance(two_calls):
    """The guide differentiates through the batched call: gradient of both halves w.r.t. the one z."""
    n = 32
    kw = dict(cond={"mean": MU_C.expand(n, 4)}, uncond={"mean": MU_U.expand(n, 4)},
              guide=frame_guide(torch.full((n, 1, 2, 1, 1), 0.7, dtype=F64), 4, "reconstruction", 3.0))
    den = Counting(GaussianDenoiser(MU_U, COV, "v"))
    batched = _gauss_sample(den, "ancestral", n, **kw)
    assert den.batches == [2 * n] * 20
    two_calls()
    ref = _gauss_sample(GaussianDenoiser(MU_U, COV, "v"), "ancestral", n, **kw)
    torch.testing.assert_close(batched, ref, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------
# Tiny SpaceTimeUNet: batched == two calls (text, num_video_frames, reconstruction guidance, padding)
# --------------------------------------------------------------------------------------------------
B, C, T, S = 2, 3, 5, 8
UNET_TOL = dict(rtol=1e-4, atol=1e-4)


def _unet_run(net, guide=None, sampler="ancestral", uncond=None, cond=None, weight=2.0, steps=4):
    cond = {**caption(B), "num_video_frames": 3} if cond is None else cond
    uncond = {**null_text_branch(cond), "num_video_frames": 3} if uncond is None else uncond
    den = Counting(net)
    with torch.no_grad():
        x = sample(den, GaussianDiffusion("v"), (B, C, T, S, S), steps=steps, sampler=sampler,
                   guidance_weight=weight, cond=cond, uncond=uncond, guide=guide,
                   generator=torch.Generator().manual_seed(5))
    return x, den.batches


@pytest.mark.parametrize("sampler", ["ancestral", "pc"])
def test_unet_batched_cfg_equals_two_calls_with_num_video_frames(two_calls, sampler):
    net = tiny_unet()
    batched, calls = _unet_run(net, sampler=sampler)
    evals = 4 + (3 if sampler == "pc" else 0)
    assert calls == [2 * B] * evals
    two_calls()
    ref, ref_calls = _unet_run(net, sampler=sampler)
    assert ref_calls == [B] * (2 * evals)
    torch.testing.assert_close(batched, ref, **UNET_TOL)
    unguided, _ = _unet_run(net, sampler=sampler, weight=0.0)
    assert (unguided - batched).abs().max() > 0.05  # the uncond branch matters here


def test_unet_batched_cfg_with_reconstruction_guidance(two_calls):
    net = tiny_unet()
    context = torch.randn(B, C, 2, S, S, generator=torch.Generator().manual_seed(6)).clamp(-1, 1)
    guide = frame_guide(context, T, "reconstruction", 4.0)
    assert isinstance(guide, ReconstructionGuidance)
    batched, calls = _unet_run(net, guide=guide)
    assert calls == [2 * B] * 4
    two_calls()
    ref, _ = _unet_run(net, guide=guide)
    torch.testing.assert_close(batched, ref, **UNET_TOL)
    assert all(p.grad is None for p in net.parameters())


def test_unet_extend_batched_equals_two_calls(two_calls):
    net = tiny_unet()
    cond = {**caption(B), "num_video_frames": 3}
    kw = dict(context_frames=2, steps=3, guidance_weight=1.5, cond=cond,
              uncond={**null_text_branch(cond), "num_video_frames": 3})

    def run():
        den = Counting(net)
        with torch.no_grad():
            x = extend(den, GaussianDiffusion("v"), (B, C, T, S, S), 8, generator=torch.Generator().manual_seed(7), **kw)
        return x, den.batches

    batched, calls = run()
    assert batched.shape == (B, C, 8, S, S) and calls == [2 * B] * (2 * 3)  # 2 windows (5 + 3 new frames) x 3 steps
    two_calls()
    ref, ref_calls = run()
    assert ref_calls == [B] * (2 * 2 * 3)
    torch.testing.assert_close(batched, ref, **UNET_TOL)


def test_unet_fallback_uncond_none_gives_the_two_call_result():
    """uncond text None (what generate() passed before) cannot be merged with cond tensors: two calls
    per step, and the same samples as the batched zero-token branch."""
    net = tiny_unet()
    fallback, calls = _unet_run(net, uncond={"text_emb": None, "text_mask": None, "num_video_frames": 3})
    assert calls == [B] * 8
    batched, calls = _unet_run(net)
    assert calls == [2 * B] * 4
    torch.testing.assert_close(batched, fallback, **UNET_TOL)


def test_unet_negative_prompt_of_another_length_is_padded_and_batched(two_calls):
    net = tiny_unet()
    cond, negative = caption(B, length=5), caption(B, length=3, seed=9)
    batched, calls = _unet_run(net, cond=cond, uncond=negative)
    assert calls == [2 * B] * 4
    two_calls()
    ref, _ = _unet_run(net, cond=cond, uncond=negative)
    torch.testing.assert_close(batched, ref, **UNET_TOL)


def test_generate_runs_one_batched_call_per_step():
    net = tiny_unet()
    batches = []
    handle = net.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    cond = caption(B)
    try:
        out = generate(net, GaussianDiffusion("v"), cond["text_emb"], cond["text_mask"], frames=4, height=S,
                       width=S, steps=3, guidance_weight=1.0, seed=0, cfg_batched=True)
        assert out.shape == (B, C, 4, S, S) and batches == [2 * B] * 3
        batches.clear()
        long = generate(net, GaussianDiffusion("v"), cond["text_emb"], cond["text_mask"], frames=4, height=S,
                        width=S, steps=2, guidance_weight=1.0, seed=0, extend_to=6, cfg_batched=True)
        assert long.shape == (B, C, 6, S, S) and batches == [2 * B] * 4
        # the default on CPU: two calls per step (measured faster there), and the same samples
        batches.clear()
        two = generate(net, GaussianDiffusion("v"), cond["text_emb"], cond["text_mask"], frames=4, height=S,
                       width=S, steps=3, guidance_weight=1.0, seed=0)
        assert batches == [B] * 6
        torch.testing.assert_close(two, out, **UNET_TOL)
    finally:
        handle.remove()
