"""trainer.throughput on its own: the FLOP count at the first batch (once, as start-up overhead), TFLOP/s
and MFU per log interval, the loader probe's verdict and the compile report; a real single-process
strategy for the cross-rank reductions, no Trainer. (The counts against an independent hand count in
a real run: tests/test_trainer_perf.py.)"""

from __future__ import annotations

import torch

from model.config import UNetConfig
from trainer.batches import prepare_batch
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.metrics import Metrics
from trainer.perf import BatchGeometry, StepFlops
from trainer.step_control import Interval, StepResult, TrainState
from trainer.strategies.base import build_strategy
from trainer.throughput import Throughput


def _cfg(**run) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model = UNetConfig(base_channels=16, channel_mults=[1, 2], num_res_blocks=1, image_size=8,
                           attention_resolutions=[4], head_dim=8, cond_dim=32, text_dim=32, groups=4)
    cfg.optim.grad_accum = 2
    for k, v in run.items():
        setattr(cfg.run, k, v)
    return cfg


def _throughput(tmp_path, cfg, **kwargs) -> Throughput:
    cpu = DistEnv(0, 1, 0, torch.device("cpu"), None)
    return Throughput(cfg, cpu.device, Metrics(tmp_path, enabled=True), TrainState(step=5),
                      build_strategy(cfg, cpu), **kwargs)


def _batch() -> dict:
    return {"video": torch.rand(2, 3, 5, 8, 8), "text_emb": torch.randn(2, 3, 32),
            "text_mask": torch.ones(2, 3, dtype=torch.bool), "num_video_frames": 4}


def _interval(steps: int = 2, seconds: float = 2.0, wait: float = 0.5, videos: int = 4) -> Interval:
    interval = Interval()
    for _ in range(steps):
        interval.add(StepResult(loss=1.0, grad_norm=1.0, lr=1e-3, ok=True, data_wait=wait / steps,
                                videos=videos // steps, batch_digest="", overhead=0.0), seconds / steps)
    return interval


def test_the_flops_hook_counts_once_at_the_first_batch_as_start_up_overhead(tmp_path, capsys):
    t = _throughput(tmp_path, _cfg(peak_tflops=2.0))
    hook = t.flops_hook()
    batch, overhead = prepare_batch([hook], _batch())
    assert overhead > 0 and batch["video"] is not None
    expected = StepFlops.count(_cfg().model, BatchGeometry.of_batch(_batch()), grad_accum=2)
    assert t.step_flops == expected
    counted = t.step_flops
    _, again = prepare_batch([hook], _batch())
    assert t.step_flops is counted  # not recounted
    out = capsys.readouterr().out
    assert "[perf] peak 2 TFLOP/s per device from run.peak_tflops" in out
    assert out.count("[perf] model FLOPs per optimizer step") == 1 and "2 x micro-batch" in out


def test_scalars_give_tflops_over_the_mean_step_time_and_mfu_only_with_a_peak(tmp_path):
    t = _throughput(tmp_path, _cfg(peak_tflops=2.0))
    t.count_flops(_batch())
    scalars: dict = {}
    tflops, mfu = t.scalars(_interval(), 1.0, scalars)
    assert tflops == t.step_flops.model / 1e12 and scalars["perf/model_tflops_per_s"] == tflops
    assert mfu == scalars["perf/mfu"] == tflops / 2.0
    no_peak = _throughput(tmp_path, _cfg())  # CPU, no run.peak_tflops: no MFU
    no_peak.count_flops(_batch())
    scalars = {}
    assert no_peak.scalars(_interval(), 1.0, scalars)[1] is None and "perf/mfu" not in scalars


def test_the_loader_probe_reports_once_against_what_training_consumes(tmp_path, capsys):
    built = []

    def probe_loader():
        built.append(1)
        return [_batch() for _ in range(4)]

    t = _throughput(tmp_path, _cfg(loader_probe_batches=4), build_probe_loader=probe_loader)
    state = torch.get_rng_state()
    t.probe_loader()
    assert built == [1] and torch.equal(torch.get_rng_state(), state)
    scalars: dict = {}
    t.scalars(_interval(), 1.0, scalars)
    assert scalars["perf/loader_to_consumption"] > 0  # 6 probed clips over (2 clips / 0.75 s of compute)
    assert "[perf] loader delivers" in capsys.readouterr().out
    scalars = {}
    t.scalars(_interval(), 1.0, scalars)
    assert "perf/loader_to_consumption" not in scalars  # once, at the first log
    off = _throughput(tmp_path, _cfg(loader_probe_batches=-1), build_probe_loader=probe_loader)
    off.probe_loader()  # -1 = only on CUDA
    assert built == [1]


def test_the_first_compiled_step_is_reported_and_recompiles_counted(tmp_path, capsys):
    from trainer.compile import Compiled

    compiled = Compiled(blocks=3, backend="eager", graphs_at_start=0)
    t = _throughput(tmp_path, _cfg(), compiled=compiled)
    t.after_step(1.5)
    assert compiled.graphs_after_warmup is not None and compiled.warmup_s == 1.5
    t.after_step(0.1)  # only the first step is reported
    assert capsys.readouterr().out.count("[compile] first step 1.5 s") == 1
    scalars: dict = {}
    t.scalars(_interval(), 1.0, scalars)
    assert scalars["perf/recompiles"] == 0
