"""Throughput in the training loop: perf/model_tflops_per_s and perf/mfu read back from the TensorBoard
event file of a short real training run agree with an independent FLOP count (made by hand from the
layers' shapes, tests/test_perf.py) divided by the logged step time; MFU needs a peak; the start-up
loader probe logs its ratio."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_perf import hand_counted_flops
from test_trainer_inprocess import TEXT_DIM, TOKENS, _cfg, _trainer

from model.unet import SpaceTimeUNet

pytestmark = pytest.mark.usefixtures("one_thread")


def tb_scalars(out_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _train(cfg) -> None:
    trainer = _trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()


def test_logged_tflops_and_mfu_agree_with_an_independent_count(tmp_path, capsys):
    peak = 0.25
    cfg = _cfg(tmp_path, run={"steps": 3, "log_every": 1, "ckpt_every": 0, "peak_tflops": peak,
                              "loader_probe_batches": 3},
               optim={"grad_accum": 2}, model={"checkpoint_policy": "all"})
    _train(cfg)
    scalars = tb_scalars(tmp_path / "run")

    # the independent count: a real CPU forward + backward of the run's model at the loader's geometry
    # (MemoryLoader: batch 2, 4 video + 1 image frames of 8x8, 3 caption tokens), per micro-step, without
    # checkpointing (model FLOPs exclude recompute; the hooks would otherwise count the recomputed forward)
    d = cfg.data
    torch.manual_seed(0)
    model = SpaceTimeUNet(dataclasses.replace(cfg.model, checkpoint_policy="none")).train()
    z = torch.randn(d.batch_size, 3, d.num_frames + d.num_image_frames, d.image_size, d.image_size)
    text = torch.randn(d.batch_size, TOKENS, TEXT_DIM)
    per_micro = hand_counted_flops(
        model, lambda: model(z, torch.zeros(d.batch_size), text, None, num_video_frames=d.num_frames).square().mean())
    flops = cfg.optim.grad_accum * per_micro

    step_time = scalars["perf/step_time_s"]
    assert sorted(step_time) == [1, 2, 3]
    for step, seconds in step_time.items():
        expected = flops / seconds / 1e12
        assert scalars["perf/model_tflops_per_s"][step] == pytest.approx(expected, rel=1e-5), step
        assert scalars["perf/mfu"][step] == pytest.approx(expected / peak, rel=1e-5), step
        # checkpoint policy "all": the chip also redoes the blocks' forward
        assert scalars["perf/hardware_tflops_per_s"][step] > 1.05 * scalars["perf/model_tflops_per_s"][step]
    assert list(scalars["perf/loader_to_consumption"]) == [1]  # once, at the first log
    assert scalars["perf/loader_to_consumption"][1] > 0

    out = capsys.readouterr().out
    assert f"[perf] peak {peak:g} TFLOP/s per device from run.peak_tflops" in out
    assert f"[perf] model FLOPs per optimizer step and rank: {flops / 1e9:.4g} GFLOP" in out
    assert "2 x micro-batch 2 x (4 + 1 image) frames x 8x8, 3 text tokens" in out
    assert "checkpoint policy all" in out
    assert "[perf] loader delivers" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert len(lines) == 3 and all(" TFLOP/s | MFU " in ln for ln in lines), lines


def test_no_peak_on_cpu_no_mfu_but_tflops_and_one_line_saying_why(tmp_path, capsys):
    cfg = _cfg(tmp_path, run={"steps": 2, "log_every": 1, "ckpt_every": 0})
    _train(cfg)
    scalars = tb_scalars(tmp_path / "run")
    assert "perf/mfu" not in scalars and "perf/loader_to_consumption" not in scalars  # probe: off on CPU
    assert set(scalars["perf/model_tflops_per_s"]) == {1, 2}
    out = capsys.readouterr().out
    assert out.count("[perf] perf/mfu not logged: no peak FLOP/s for device 'cpu'; set run.peak_tflops") == 1
    assert all("TFLOP/s" in ln and "MFU" not in ln for ln in out.splitlines() if ln.startswith("step "))
