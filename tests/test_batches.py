"""trainer.batches and model.conditioning on their own: the batch stream fenced off from the training
RNG, batch hooks and their start-up overhead, caption padding, and the step's conditioning."""

from __future__ import annotations

import time

import pytest
import torch

from model.conditioning import aux_loss_weights, clip_conditions, measured_motion
from model.config import UNetConfig
from model.motion import global_motion
from trainer.batches import Batches, BatchHook, Conditioning, StaticTextLength, batch_digest, prepare_batch


def _batch(b: int = 2, tokens: int = 3, frames: int = 5, video_frames: int = 4) -> dict:
    return {"video": torch.rand(b, 3, frames, 8, 8), "text_emb": torch.randn(b, tokens, 4),
            "text_mask": torch.ones(b, tokens, dtype=torch.bool), "num_video_frames": video_frames}


class RandomLoader:
    """A finite loader that draws from the global RNG when its iterator starts (as torch's DataLoader)."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        torch.rand(1)
        return iter(range(self.n))


def test_batches_do_not_move_the_training_rng_and_restart_a_finite_loader():
    batches = Batches(RandomLoader(2))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    drawn = [batches.next() for _ in range(5)]
    assert drawn == [0, 1, 0, 1, 0]  # the next pass starts after the last batch
    assert torch.equal(torch.rand(3), expected)
    batches.restart()
    assert batches.next() == 0


def test_batch_digest_is_independent_of_order():
    assert batch_digest(["b", "a", "a"]) == batch_digest(["a", "b", "a"]) != batch_digest(["a", "b"])


class Slow(BatchHook):
    def __init__(self, seconds: float, step_time: bool):
        self.seconds, self.counts_as_step_time = seconds, step_time

    def __call__(self, batch):
        time.sleep(self.seconds)
        return {**batch, "seen": batch.get("seen", 0) + 1}


def test_prepare_batch_threads_every_hook_and_reports_only_start_up_seconds():
    batch, overhead = prepare_batch([Slow(0.05, step_time=True), Slow(0.2, step_time=False)], _batch())
    assert batch["seen"] == 2
    assert 0.2 <= overhead < 0.25  # the start-up hook's time, not the step-time hook's
    assert prepare_batch([], _batch())[1] == 0.0


def test_static_text_length_pads_captions_masked_and_leaves_long_ones():
    batch = StaticTextLength(6)(_batch(tokens=3))
    assert batch["text_emb"].shape == (2, 6, 4) and batch["text_mask"].shape == (2, 6)
    assert batch["text_mask"][:, :3].all() and not batch["text_mask"][:, 3:].any()
    assert torch.equal(batch["text_emb"][:, 3:], torch.zeros(2, 3, 4))
    long = _batch(tokens=7)
    assert StaticTextLength(6)(long) is long


def test_conditioning_drops_captions_only_in_training_and_adds_the_clip_conditions():
    seen = []

    def recorder(batch, x, cond):
        seen.append((x, cond["num_video_frames"]))
        return {"extra": x.mean()}

    c = Conditioning(torch.device("cpu"), caption_dropout=1.0, from_clip=(recorder,))
    batch = _batch()
    assert c.text(batch)["text_mask"].all()  # no dropout outside training
    x = batch["video"]
    cond = c.for_training(batch, x)
    assert not cond["text_mask"].any()  # dropout 1: every caption dropped (the null embedding)
    assert seen == [(x, 4)] and cond["extra"] == x.mean() and cond["num_video_frames"] == 4


def test_the_model_measures_motion_on_the_video_frames_only_when_configured(caplog):
    """Shards made before the motion was stored (no field, or NaN rows): measured on the fly on the
    video frames (not the joint image frames), with one warning."""
    import model.conditioning as conditioning

    assert clip_conditions(UNetConfig()) == ()
    assert clip_conditions(UNetConfig(motion_conditioning=True)) == (measured_motion,)
    assert aux_loss_weights(UNetConfig()) == {}
    assert aux_loss_weights(UNetConfig(motion_conditioning=True, motion_loss_weight=0.5)) == {"motion_loss": 0.5}
    x = torch.rand(2, 3, 5, 8, 8)
    x[:, :, 4] = 0  # the joint image frame after the 4 video frames must not count
    conditioning._warned_on_the_fly = False
    motion = measured_motion({}, x, {"num_video_frames": 4})["motion"]
    torch.testing.assert_close(motion, global_motion(x[:, :, :4]))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(motion, global_motion(x))
    measured_motion({}, x, {"num_video_frames": 4})
    assert caplog.text.count("measuring it on the fly") == 1


def test_the_model_reads_the_stored_motion_and_measures_only_the_rows_without_it():
    x = torch.rand(2, 3, 5, 8, 8)
    stored = torch.tensor([[0.1, -0.2, 0.3, -0.4], [float("nan")] * 4])
    motion = measured_motion({"global_motion": stored}, x, {"num_video_frames": 4})["motion"]
    torch.testing.assert_close(motion[0], stored[0])
    torch.testing.assert_close(motion[1], global_motion(x[:, :, :4])[1])
    with pytest.raises(ValueError, match="global_motion.*must be"):
        measured_motion({"global_motion": torch.zeros(2, 2)}, x, {"num_video_frames": 4})
