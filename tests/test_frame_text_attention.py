"""model.frame_text_attention="cross": the text cross-attention's queries carry the frame index, so
each frame can read the caption in its own way (docs/motion.md, "A general network"). Off, the model is
bit for bit the plain one; on, a fresh model starts as the plain one, image frames of joint training
stay independent (tests/test_temporal_options.py, which runs its option tests on this one too), padded
caption tokens stay unread, and activation checkpointing gives the same gradients."""

from __future__ import annotations

import pytest
import torch
from test_unet import inputs, randomize_zero_init, tiny_cfg

from model.unet import SpaceTimeUNet

CROSS = {"frame_text_attention": "cross"}


def _model(seed: int = 0, **kw) -> SpaceTimeUNet:
    torch.manual_seed(seed)
    return randomize_zero_init(SpaceTimeUNet(tiny_cfg(**kw)).eval(), seed)


def test_option_off_is_bitwise_the_plain_model():
    torch.manual_seed(0)
    plain = SpaceTimeUNet(tiny_cfg()).eval()
    torch.manual_seed(0)
    off = SpaceTimeUNet(tiny_cfg(frame_text_attention="none")).eval()
    assert list(off.state_dict()) == list(plain.state_dict())
    assert not any("query_position" in name for name in off.state_dict())
    randomize_zero_init(plain)
    randomize_zero_init(off)
    z, logsnr, text, mask = inputs(f=6)
    assert torch.equal(off(z, logsnr, text, mask, num_video_frames=4), plain(z, logsnr, text, mask, num_video_frames=4))


def test_a_fresh_model_with_the_option_is_bitwise_the_plain_one():
    """The query position is zero-initialised: adding it changes nothing until it is trained."""
    torch.manual_seed(0)
    plain = randomize_zero_init(SpaceTimeUNet(tiny_cfg()).eval())
    cross = SpaceTimeUNet(tiny_cfg(**CROSS)).eval()
    missing, unexpected = cross.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("query_position" in name for name in missing)
    z, logsnr, text, mask = inputs(f=5)
    assert torch.equal(cross(z, logsnr, text, mask, num_video_frames=4), plain(z, logsnr, text, mask, num_video_frames=4))


def test_frames_read_the_caption_by_their_position():
    """A clip whose frames are all the same: the plain network (per-frame blocks, a relative temporal
    bias) gives every frame the same output; with the query position each frame its own."""
    z, logsnr, text, mask = inputs(f=5)
    still = z[:, :, :1].expand_as(z).contiguous()
    for option, differs in (({}, False), (CROSS, True)):
        out = _model(**option)(still, logsnr, text, mask)
        assert out.shape == z.shape
        spread = (out - out[:, :, :1]).abs().max().item()
        assert (spread > 1e-3) == differs, (option, spread)


def test_padded_tokens_are_not_read_and_a_dropped_caption_is_the_null_branch():
    model = _model(**CROSS)
    z, logsnr, text, mask = inputs(f=4)
    base = model(z, logsnr, text, mask)
    noisy_padding = text.clone()
    noisy_padding[0, 3:] += 5.0  # row 0's tokens 3: are padding
    torch.testing.assert_close(model(z, logsnr, noisy_padding, mask), base, atol=1e-5, rtol=1e-5)
    dropped = torch.zeros_like(mask)
    torch.testing.assert_close(model(z, logsnr, text, dropped), model(z, logsnr, None, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["all", "attention", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(policy):
    z, logsnr, text, mask = inputs(f=6)
    grads = []
    for p in ("none", policy):
        model = _model(**CROSS, checkpoint_policy=p).train()
        model(z, logsnr, text, mask, num_video_frames=4).square().mean().backward()
        grads.append({n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    position = [n for n in grads[0] if "query_position" in n]
    assert position and all(grads[0][n].abs().max() > 0 for n in position)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_option_needs_text_cross_attention():
    with pytest.raises(ValueError, match="model.frame_text_attention.*model.cross_attention=true"):
        SpaceTimeUNet(tiny_cfg(cross_attention=False, **CROSS))
