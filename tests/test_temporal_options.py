"""The U-Net's optional temporal pieces (docs/model.md, "Learning the direction of motion"): relative
position values in temporal attention, a residual temporal convolution, a frame-position embedding;
and the shifted log-SNR schedule. Each keeps joint image+video training exact (image frames see
only themselves) and starts as the identity of the plain design."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_unet import inputs, randomize_zero_init, tiny_cfg

from model.attention import attention_with_relative_values
from model.blocks import TemporalConv
from model.diffusion import GaussianDiffusion, cosine_logsnr, cosine_logsnr_inverse
from model.unet import SpaceTimeUNet

OPTIONS = [{"rel_pos_values": True}, {"temporal_conv_kernel": 3}, {"frame_position_embedding": True},
           {"frame_text_attention": "cross"}]


def _model(seed: int = 0, **kw) -> SpaceTimeUNet:
    torch.manual_seed(seed)
    return randomize_zero_init(SpaceTimeUNet(tiny_cfg(**kw)).eval(), seed)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: next(iter(o)))
def test_image_frames_stay_independent_and_equal_a_lone_image(option):
    model = _model(**option)
    z, logsnr, text, mask = inputs(f=6)
    base = model(z, logsnr, text, mask, num_video_frames=4)
    changed = z.clone()
    changed[:, :, 1] += 1.0
    out = model(changed, logsnr, text, mask, num_video_frames=4)
    torch.testing.assert_close(out[:, :, 4:], base[:, :, 4:], atol=1e-5, rtol=1e-5)
    assert (out[:, :, 0] - base[:, :, 0]).abs().max() > 1e-3
    alone = model(z[:, :, 5:6], logsnr, text, mask)
    torch.testing.assert_close(base[:, :, 5:6], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: next(iter(o)))
def test_a_fresh_model_with_the_option_equals_the_plain_one(option):
    """Zero-initialised where it matters: switching an option on changes nothing until trained."""
    torch.manual_seed(0)
    plain = SpaceTimeUNet(tiny_cfg()).eval()
    torch.manual_seed(0)
    extended = SpaceTimeUNet(tiny_cfg(**option)).eval()
    missing, unexpected = extended.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing
    randomize_zero_init(plain)
    with torch.no_grad():  # the same random output layers in both, leaving the option's own zeros
        for name, p in extended.named_parameters():
            if name in plain.state_dict():
                p.copy_(plain.state_dict()[name])
    z, logsnr, text, mask = inputs(f=5)
    if "rel_pos_values" in option:  # a value embedding is not zero-initialised; zero it to compare
        for m in extended.modules():
            if getattr(m, "values", None) is not None:
                torch.nn.init.zeros_(m.values.weight)
    torch.testing.assert_close(extended(z, logsnr, text, mask, num_video_frames=4),
                               plain(z, logsnr, text, mask, num_video_frames=4), atol=1e-5, rtol=1e-5)


def test_frame_position_embedding_tells_identical_frames_apart():
    z, logsnr, text, mask = inputs(f=4)
    same = z[:, :, :1].repeat(1, 1, 4, 1, 1)
    plain = _model()(same, logsnr, text, mask)
    torch.testing.assert_close(plain[:, :, 0], plain[:, :, 1], atol=1e-5, rtol=1e-5)  # only edges differ
    out = _model(frame_position_embedding=True)(same, logsnr, text, mask)
    assert (out[:, :, 1] - out[:, :, 2]).abs().max() > 1e-3


def test_relative_values_attention_closed_form():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 4, generator=g) for _ in range(3))
    bias = torch.randn(1, 2, 5, 5, generator=g)
    bias[..., 3, :3] = float("-inf")  # a masked row, as for an image frame
    torch.testing.assert_close(attention_with_relative_values(q, k, v, bias, torch.zeros(2, 5, 5, 4)),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=bias), atol=1e-6, rtol=1e-5)
    # q = 0: the weights are softmax(bias), so each output adds sum_j a_ij r_ij to the attended values
    r = torch.randn(2, 5, 5, 4, generator=g)
    zero_q = torch.zeros_like(q)
    weights = bias.softmax(dim=-1)
    expected = weights @ v + torch.einsum("nhij,hijd->nhid", weights.expand(3, -1, -1, -1), r)
    torch.testing.assert_close(attention_with_relative_values(zero_q, k, v, bias, r), expected, atol=1e-6, rtol=1e-5)


def test_temporal_conv_has_its_own_weights_per_frame_offset():
    """A kernel that copies the previous frame: frame t gets x_{t-1}, frame 0 gets nothing from before,
    and frames after num_video_frames are untouched."""
    tc = TemporalConv(4, groups=1)
    tc.norm = torch.nn.Identity()
    with torch.no_grad():
        tc.conv.weight.zero_()
        tc.conv.weight[:, :, 0] = torch.eye(4)  # tap on t-1
    x = torch.randn(2 * 5, 4, 3, 3)  # B=2, F=5 folded
    out = tc(x, frames=5, num_video_frames=4).reshape(2, 5, 4, 3, 3)
    xs = F.silu(x).reshape(2, 5, 4, 3, 3)
    x5 = x.reshape(2, 5, 4, 3, 3)
    torch.testing.assert_close(out[:, 1:4], x5[:, 1:4] + xs[:, 0:3])
    torch.testing.assert_close(out[:, 0], x5[:, 0])
    torch.testing.assert_close(out[:, 4], x5[:, 4])
    with pytest.raises(ValueError, match="odd"):
        TemporalConv(4, 1, kernel=2)


def test_shifted_schedule_keeps_the_ends_and_inverts():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (-3.0, 0.0, 2.0):
        lam = cosine_logsnr(t, -20, 20, shift)
        assert lam[0] == 20 and lam[-1] == -20 and torch.all(lam[1:] < lam[:-1])
        torch.testing.assert_close(cosine_logsnr_inverse(lam, -20, 20, shift), t)
    mid = cosine_logsnr(torch.tensor(0.5, dtype=torch.float64), -20, 20, -3.0)
    assert mid == pytest.approx(-3.0, abs=1e-3)  # the (truncated) unshifted curve passes ~0 at t = 0.5
    d = GaussianDiffusion(prediction="v", logsnr_shift=-3.0)
    torch.testing.assert_close(d.t_of_logsnr(d.logsnr(t)), t)
    with pytest.raises(ValueError, match="logsnr_shift"):
        GaussianDiffusion("v", logsnr_shift=25.0)
