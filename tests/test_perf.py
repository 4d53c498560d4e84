"""trainer.perf and model.checkpoint_policy: the meta-device FLOP count against an independent count
made by hand from the layers' shapes during a real CPU forward, the peak table, activation memory per
checkpoint policy, and that every checkpoint policy gives the gradients of no checkpointing.

Tiny configs only (tests/test_unet.py's): each test runs in a second or two on one CPU thread."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_unet import TEXT_DIM, inputs, make_model, tiny_cfg
from torch import nn

from common.config import ConfigError, RenamedWarning, load_config
from model.blocks import SpaceConv
from model.config import UNetConfig
from model.unet import CHECKPOINT_POLICIES, SpaceTimeUNet
from trainer.config import TrainConfig
from trainer.perf import (
    PEAK_TFLOPS,
    ActivationMemory,
    BatchGeometry,
    StepFlops,
    count_step_flops,
    known_accelerator,
    peak_tflops,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------- an independent count
def hand_counted_flops(model: nn.Module, run) -> int:
    """FLOPs of forward + backward of `run()` (which returns the loss) counted from shapes seen by
    forward hooks on every Linear/Conv and by wrapping scaled_dot_product_attention; nothing from
    torch.utils.flop_counter. Conventions of every MFU count: a multiply-add is 2 FLOPs; backward is
    the weight gradient (= forward) plus the input gradient (= forward) where the input needs one;
    attention is QK^T and AV (2 * 2 * N*h*Sq*Sk*d forward, twice that backward); norms, activations
    and bias adds are not counted."""
    total = 0

    def layer_hook(mod, inp, out):
        nonlocal total
        x = inp[0]
        if isinstance(mod, nn.Linear):
            macs = out.numel() * mod.in_features
        elif isinstance(mod, SpaceConv):
            macs = out.numel() * mod.in_channels // mod.groups * mod.kernel_size[1] * mod.kernel_size[2]
        elif isinstance(mod, nn.Conv1d):
            macs = out.numel() * mod.in_channels // mod.groups * mod.kernel_size[0]
        else:
            return
        fwd = 2 * macs
        total += fwd + fwd + (fwd if x.requires_grad else 0)

    real_sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *args, **kwargs):
        nonlocal total
        assert q.requires_grad and k.requires_grad and v.requires_grad
        n_h = q.shape[:-2].numel()
        fwd = 2 * 2 * n_h * q.shape[-2] * k.shape[-2] * q.shape[-1]
        total += fwd + 2 * fwd
        return real_sdpa(q, k, v, *args, **kwargs)

    handles = [m.register_forward_hook(layer_hook) for m in model.modules()]
    F.scaled_dot_product_attention = counting_sdpa
    try:
        run().backward()
    finally:
        F.scaled_dot_product_attention = real_sdpa
        for h in handles:
            h.remove()
    return total


@pytest.mark.parametrize("kw", [{}, {"temporal_conv_kernel": 3, "frame_position_embedding": True}])
def test_meta_flop_count_equals_a_hand_count_of_a_real_step(kw):
    model = make_model(**kw).train()
    z, logsnr, text, mask = inputs(b=2, f=5, L=5)
    expected = hand_counted_flops(model, lambda: model(z, logsnr, text, mask, num_video_frames=3).square().mean())
    geometry = BatchGeometry(batch=2, frames=5, num_video_frames=3, height=8, width=8, text_len=5)
    assert count_step_flops(tiny_cfg(**kw), geometry) == expected
    # grad accumulation multiplies, and the count follows the geometry (all but the frame-position
    # embedding, computed once per frame, scales with the batch)
    assert StepFlops.count(tiny_cfg(**kw), geometry, grad_accum=3).model == 3 * expected
    doubled = count_step_flops(tiny_cfg(**kw), dataclasses.replace(geometry, batch=4))
    assert doubled == 2 * expected if not kw else 1.9 * expected < doubled < 2 * expected


def test_hardware_flops_include_recompute_model_flops_do_not():
    geometry = BatchGeometry(batch=1, frames=4, num_video_frames=4, height=8, width=8, text_len=3)
    model_flops = count_step_flops(tiny_cfg(), geometry, "none")
    for policy in ("all", "attention", "resblocks", "every_k"):
        f = StepFlops.count(tiny_cfg(checkpoint_policy=policy), geometry)
        assert f.model == model_flops, policy
        assert f.hardware > f.model, policy
    # full recompute = one more forward: hardware - model = the forward FLOPs of the blocks (< 1/3)
    full = StepFlops.count(tiny_cfg(checkpoint_policy="all"), geometry)
    assert full.hardware < model_flops * 4 / 3
    # selective keeps every matmul/conv/SDPA output: only uncounted elementwise work is recomputed
    assert StepFlops.count(tiny_cfg(checkpoint_policy="selective"), geometry).hardware == model_flops


# ------------------------------------------------------------------------- checkpoint policies
@pytest.mark.parametrize("policy", [p for p in CHECKPOINT_POLICIES if p != "none"])
def test_every_checkpoint_policy_gives_the_gradients_of_none(policy):
    """Same weights, same dropout masks (checkpoint replays the RNG): outputs and every parameter's
    gradient match no checkpointing to float rounding (in practice bitwise on CPU)."""
    z, logsnr, text, mask = inputs(b=2, f=5)
    grads = {}
    for p in ("none", policy):
        model = make_model(dropout=0.1, temporal_conv_kernel=3, checkpoint_policy=p, checkpoint_every_k=3).train()
        torch.manual_seed(7)
        out = model(z, logsnr, text, mask, num_video_frames=3)
        out.square().mean().backward()
        grads[p] = (out.detach(), {n: q.grad for n, q in model.named_parameters()})
        if p != "none":
            assert model.checkpointed_blocks(), policy
    torch.testing.assert_close(grads[policy][0], grads["none"][0], rtol=0, atol=1e-7)
    for name, g in grads["none"][1].items():
        assert g is not None and grads[policy][1][name] is not None, name
        torch.testing.assert_close(grads[policy][1][name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_policies_choose_their_blocks():
    from model.attention import SpaceTimeAttention
    from model.blocks import ResBlock

    model = make_model(temporal_conv_kernel=3, checkpoint_every_k=3)
    blocks = model.blocks()
    assert model.checkpointed_blocks("none") == []
    assert model.checkpointed_blocks("all") == blocks == model.checkpointed_blocks("selective")
    assert model.checkpointed_blocks("every_k") == blocks[::3]
    attn = model.checkpointed_blocks("attention")
    res = model.checkpointed_blocks("resblocks")
    assert attn and all(isinstance(b, SpaceTimeAttention) for b in attn)
    assert res and all(isinstance(b, ResBlock) for b in res)
    assert len(attn) + len(res) < len(blocks)  # the temporal convs are neither


def test_activation_memory_orders_the_policies():
    """Saved activations (measured on meta tensors, so also for the selective policy's own cache):
    none keeps the most, all the least, the partial policies in between; the peak of forward +
    backward is never below what forward keeps."""
    cfg = tiny_cfg(temporal_conv_kernel=3)
    saved = {}
    for policy in CHECKPOINT_POLICIES:
        with torch.device("meta"):
            model = SpaceTimeUNet(dataclasses.replace(cfg, checkpoint_policy=policy)).train()
            z, text = torch.empty(2, 3, 5, 8, 8), torch.empty(2, 4, TEXT_DIM)
        with ActivationMemory() as mem:
            loss = model(z, torch.empty(2), text, None, num_video_frames=3).square().mean()
            mem.retained()
            loss.backward()
        saved[policy] = mem.retained_bytes
        assert mem.peak_bytes >= mem.retained_bytes > 0, policy
    assert saved["all"] == min(saved.values()) and saved["none"] == max(saved.values()), saved
    for policy in ("attention", "resblocks", "every_k", "selective"):
        assert saved["all"] < saved[policy] < saved["none"], (policy, saved)


def test_old_gradient_checkpointing_key_means_all_with_a_warning(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  gradient_checkpointing: true\n")
    with pytest.warns(RenamedWarning, match="gradient_checkpointing.*checkpoint_policy: all"):
        cfg = load_config(TrainConfig, path)
    assert cfg.model.activation_checkpointing == "all"
    with pytest.raises(ConfigError, match="gradient_checkpointing=true and model.checkpoint_policy='attention'"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RenamedWarning)
            load_config(TrainConfig, path, ["model.checkpoint_policy=attention"])
    with pytest.raises(ConfigError, match="model.checkpoint_policy: 'some' is not one of"):
        load_config(TrainConfig, None, ["model.checkpoint_policy=some"])
    with pytest.raises(ConfigError, match="checkpoint_every_k must be >= 1"):
        load_config(TrainConfig, None, ["model.checkpoint_every_k=0"])
    assert UNetConfig().activation_checkpointing == "none"


# ------------------------------------------------------------------------- peaks
@pytest.mark.parametrize("name,row", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA L40S", "L40S"), ("AMD Instinct MI300X", "MI300X"),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_device_names_map_to_the_peak_table(name, row):
    assert known_accelerator(name) == row
    if row:
        assert set(PEAK_TFLOPS[row]) == {"bf16", "fp16", "tf32", "fp32"}


def test_cpu_needs_an_explicit_peak():
    peak, why = peak_tflops(torch.device("cpu"), "bf16")
    assert peak is None and "run.peak_tflops" in why
    assert peak_tflops(torch.device("cpu"), "bf16", override=2.5) == (2.5, "run.peak_tflops = 2.5")
    with pytest.raises(ConfigError, match="run.peak_tflops must be >= 0"):
        load_config(TrainConfig, None, ["run.peak_tflops=-1"])
