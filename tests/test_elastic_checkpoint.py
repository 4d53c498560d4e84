"""Issue 10 item 2, topology-independent checkpoints, through the real CLI on 1 and 2 gloo processes.

A run is SIGKILLed after its mid-run checkpoint (step 2 of 4) and resumed with no flag on another
number of ranks and/or another strategy (fsdp <-> ddp <-> single). Each resume must
- load the saved state bitwise: tests/resume_dump.py builds the real Trainer on the new topology and
  gathers its full parameters, EMA and AdamW moments/step, compared here with the checkpoint read
  directly by trainer.strategies.dcp_state.read_full;
- finish with exit 0 and log, step for step, the batch_digest of an uninterrupted run at the same
  global batch (2 = 2 ranks x 1 = 1 rank x 2; the digest does not depend on strategy or world size).

The killed runs are module fixtures; each test resumes a copy of one, so a run is made once.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from process_group import MULTI_PROCESS_TIMEOUT_S
from trainer_helpers import run_in_group, step_log, tiny_config, torchrun_cmd, train_cmd

from trainer.checkpoint import checkpoint_root, find_latest, read_state
from trainer.strategies.dcp_state import read_full

TIMEOUT = MULTI_PROCESS_TIMEOUT_S
# the same global batch (2) on 1 and 2 ranks
LAYOUT = {1: {"batch_size": 2}, 2: {"batch_size": 1}}


# the killed 2-rank fsdp and ZeRO-3 runs also validate, sample and evaluate at step 2 (before their step-2
# checkpoint, on the weights it holds): test_two_rank_fsdp_validates_samples_and_evaluates_like_one_process
# and the zero3 case of test_deepspeed_two_ranks_resume_on_one_rank_through_the_universal_checkpoint
CHECKS_AT = 2
CHECKS_RUN = {"val_every": CHECKS_AT, "val_batches": 1, "sample_every": CHECKS_AT, "sample_steps": 2,
              "sample_prompts": ["a red square moving right"], "eval_every": CHECKS_AT}


def _eval_section(detector: str) -> dict:
    """The synthetic-task scores, FVD with the stand-in detector, and upsampling of 2 held-out clips (FVD
    needs 2)."""
    return {"synthetic": True, "seeds": 1, "steps": 1, "fvd_detector": detector, "fvd_clips": 2, "batch_size": 8,
            "tasks": ["upsample"], "task_clips": 2}


def _config(path: Path, shards: str, out: Path, strategy: str, nproc: int, zero_stage: int = 2,
            detector: str | None = None) -> Path:
    """With `detector` (the FVD stand-in), validation, samples and evaluation run at step CHECKS_AT."""
    run, data, sections = {"steps": 4, "ckpt_every": 2}, dict(LAYOUT[nproc]), {}
    if detector is not None:
        run.update(CHECKS_RUN)
        data["val_shards"] = shards
        sections["eval"] = _eval_section(detector)
    return tiny_config(path, shards, out, parallel={"strategy": strategy, "zero_stage": zero_stage}, data=data,
                       run=run, **sections)


def _train(config: Path, nproc: int, **env: str):
    return run_in_group(train_cmd(config, nproc=nproc), TIMEOUT, **env)


def _digests(out_dir: Path) -> list[str]:
    log = step_log(out_dir)
    assert sorted(log) == list(range(len(log)))
    return [log[s]["batch_digest"] for s in sorted(log)]


def _killed_run(tmp: Path, shards: str, strategy: str, nproc: int, zero_stage: int = 2,
                detector: str | None = None) -> Path:
    """out_dir of a run SIGKILLed before step 3, i.e. after its step-2 checkpoint (with `detector`: see
    _config; its config stays in out_dir/../run.yaml)."""
    out = tmp / "run"
    r = _train(_config(tmp / "run.yaml", shards, out, strategy, nproc, zero_stage, detector), nproc,
               VDM_TEST_KILL_AT_STEP="3")
    assert r.returncode != 0, r.stdout + r.stderr
    ckpt = find_latest(out)
    assert ckpt.name == "step-000002", r.stdout + r.stderr
    assert read_state(ckpt)["world_size"] == nproc and read_state(ckpt)["strategy"] == strategy
    return out


@pytest.fixture(scope="module")
def reference_digests(tmp_path_factory, trainer_shards) -> list[str]:
    """batch_digest of every step of an uninterrupted run (one process, global batch 2)."""
    tmp = tmp_path_factory.mktemp("straight")
    r = _train(_config(tmp / "c.yaml", trainer_shards[0], tmp / "run", "single", 1), 1)
    assert r.returncode == 0, r.stdout + r.stderr
    digests = _digests(tmp / "run")
    assert len(digests) == 4 and len(set(digests)) == 4
    return digests


@pytest.fixture(scope="module")
def fsdp2_killed(tmp_path_factory, trainer_shards, standin_i3d_file) -> Path:
    return _killed_run(tmp_path_factory.mktemp("fsdp2"), trainer_shards[0], "fsdp", 2, detector=str(standin_i3d_file))


@pytest.fixture(scope="module")
def fsdp1_killed(tmp_path_factory, trainer_shards) -> Path:
    return _killed_run(tmp_path_factory.mktemp("fsdp1"), trainer_shards[0], "fsdp", 1)


@pytest.fixture(scope="module")
def ddp2_killed(tmp_path_factory, trainer_shards) -> Path:
    return _killed_run(tmp_path_factory.mktemp("ddp2"), trainer_shards[0], "ddp", 2)


def _assert_resumed_bitwise(dump_file: Path, ckpt: Path) -> None:
    """What the new topology loaded (gathered in full) equals what the old one saved, bit for bit."""
    dump = torch.load(dump_file, weights_only=True)
    assert int(dump["step"]) == 2
    saved_model, saved_ema = read_full(ckpt, "model"), read_full(ckpt, "ema")
    saved_optim = read_full(ckpt, "optim.state")
    assert sorted(dump["model"]) == sorted(saved_model) and len(saved_model) > 10
    bad = [k for k in saved_model if not torch.equal(dump["model"][k], saved_model[k])]
    assert not bad, f"parameters/buffers differ after the reshard: {bad[:5]}"
    assert len(saved_ema) > 10 and set(saved_ema) <= set(dump["ema"])
    bad = [k for k in saved_ema if not torch.equal(dump["ema"][k], saved_ema[k])]
    assert not bad, f"EMA differs after the reshard: {bad[:5]}"
    # the EMA is not the live weights (decay 0.9 after 2 steps): comparing it would catch a swap
    assert any(not torch.equal(saved_ema[k], saved_model[k]) for k in saved_ema)
    assert sorted(dump["optim"]) == sorted(saved_optim)
    assert {k.rsplit(".", 1)[1] for k in saved_optim} == {"exp_avg", "exp_avg_sq", "step"}
    bad = [k for k in saved_optim if not torch.equal(dump["optim"][k], saved_optim[k])]
    assert not bad, f"AdamW state differs after the reshard: {bad[:5]}"
    steps = {float(v) for k, v in saved_optim.items() if k.endswith(".step")}
    assert steps and max(steps) == 2.0  # two optimizer steps taken, the count continues from there


def _resume_elsewhere(tmp: Path, killed: Path, shards: str, strategy: str, nproc: int,
                      reference: list[str]) -> None:
    """Copy the killed run, check the state the new topology loads, and the run it then finishes (one
    launch: tests/resume_dump.py --then-train trains on as trainer.train does)."""
    out = tmp / "resumed"
    shutil.copytree(killed, out)
    ckpt = find_latest(out)
    config = _config(tmp / "resume.yaml", shards, out, strategy, nproc)
    dump = tmp / "dump.pt"
    r = run_in_group(torchrun_cmd("tests/resume_dump.py", nproc, "--config", str(config), "--out", str(dump),
                                  "--then-train"), TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_resumed_bitwise(dump, ckpt)
    assert "[resume]" in r.stdout and "step-000002" in r.stdout
    assert _digests(out) == reference
    assert read_state(find_latest(out))["step"] == 4


def test_fsdp_two_ranks_resume_on_one_rank(tmp_path, trainer_shards, fsdp2_killed, reference_digests):
    _resume_elsewhere(tmp_path, fsdp2_killed, trainer_shards[0], "fsdp", 1, reference_digests)


def test_fsdp_one_rank_resumes_on_two_ranks(tmp_path, trainer_shards, fsdp1_killed, reference_digests):
    _resume_elsewhere(tmp_path, fsdp1_killed, trainer_shards[0], "fsdp", 2, reference_digests)


def test_fsdp_checkpoint_resumes_under_ddp(tmp_path, trainer_shards, fsdp2_killed, reference_digests):
    _resume_elsewhere(tmp_path, fsdp2_killed, trainer_shards[0], "ddp", 2, reference_digests)


def test_ddp_checkpoint_resumes_under_fsdp_on_one_rank(tmp_path, trainer_shards, ddp2_killed, reference_digests):
    _resume_elsewhere(tmp_path, ddp2_killed, trainer_shards[0], "fsdp", 1, reference_digests)


def _one_process_periodic_checks(run: Path, out: Path, model: dict, ema: dict) -> dict[str, float]:
    """Validation, samples and evaluation at step CHECKS_AT by the trainer's own components in this one
    process (single strategy, plain model) on the given full weights and EMA, with `run`'s config
    (out_dir moved to `out`). Returns the val/* and eval/* scalars."""
    from common.config import load_config
    from model.diffusion import GaussianDiffusion
    from model.unet import SpaceTimeUNet
    from trainer.config import TrainConfig
    from trainer.distributed import DistEnv
    from trainer.ema import EMA
    from trainer.metrics import Metrics
    from trainer.strategies.base import build_strategy
    from trainer.validation import InLoopEvaluation, TrainingSamples, Validator

    cfg = load_config(TrainConfig, run.parent / "run.yaml", ["parallel.strategy=single", f"run.out_dir={out}"])
    net = SpaceTimeUNet(cfg.model)
    net.load_state_dict(model)
    strategy = build_strategy(cfg, DistEnv(0, 1, 0, torch.device("cpu"), None))
    strategy.setup(net)
    shadow = EMA(strategy.local_params(), cfg.run.ema_decay)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(ema)
    with torch.no_grad():
        for tensor, name in zip(shadow.shadow, names):
            tensor.copy_(ema[name])
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    metrics = Metrics(out, enabled=True)
    encoder = read_state(find_latest(run))["text_encoder"]
    scalars = Validator(cfg, strategy, diffusion, metrics, "cpu").run(CHECKS_AT)
    TrainingSamples(cfg, strategy, shadow, diffusion, metrics, "cpu", 0, text_encoder=encoder).run(CHECKS_AT)
    scalars.update(InLoopEvaluation.for_run(cfg, strategy, shadow, metrics, "cpu", 0, text_encoder=encoder)
                   .run(CHECKS_AT))
    metrics.close()
    return scalars


def _assert_periodic_checks_like_one_process(run: Path, out: Path, model: dict, ema: dict) -> None:
    """The 2-rank run `run` validated, sampled and evaluated at step CHECKS_AT (TensorBoard events read
    back with TensorBoard's reader, sample files, eval_log.jsonl), with what one process gives on the
    weights (`model`) and EMA (`ema`) it checkpointed at that step: the same val loss per band (every
    rank runs the same batches through the sharded model), bitwise the same sample GIFs and the same
    eval scores (rank 0 works on the gathered EMA)."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert read_state(run / "checkpoints" / f"step-{CHECKS_AT:06d}")["step"] == CHECKS_AT
    one = _one_process_periodic_checks(run, out, model, ema)
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    logged = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"] if tag.startswith(("val/", "eval/"))}
    val_tags = {t for t in one if t.startswith("val/")}
    eval_tags = {t for t in one if t.startswith("eval/")}
    assert len([t for t in val_tags if t.startswith("val/loss_band/")]) == 8 and "val/loss" in val_tags
    assert {"eval/colour_acc", "eval/direction_acc", "eval/fvd", "eval/upsample_psnr"} <= eval_tags, eval_tags
    assert set(logged) == val_tags | eval_tags, sorted(set(logged) ^ (val_tags | eval_tags))
    timings = {t for t in eval_tags if t.endswith(("_seconds", "_per_s"))}  # how fast, not what
    assert timings and len(timings) < len(eval_tags) / 2, timings
    for tag, events in logged.items():
        assert [e.step for e in events] == [CHECKS_AT], (tag, events)
        if tag not in timings:
            assert events[0].value == pytest.approx(one[tag], rel=1e-5, abs=1e-7), tag
    records = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [CHECKS_AT]
    for tag in eval_tags - timings:
        assert records[0][tag.removeprefix("eval/")] == pytest.approx(one[tag], rel=1e-6, abs=1e-9), tag
    assert [e.step for e in acc.Images("samples/0")] == [CHECKS_AT]
    name = f"samples/step-{CHECKS_AT:06d}"
    gifs = sorted((run / name).glob("*.gif"))
    assert [p.name for p in gifs] == [p.name for p in sorted((out / name).glob("*.gif"))] and len(gifs) == 1
    assert all(p.read_bytes() == (out / name / p.name).read_bytes() for p in gifs), "samples differ from one process'"
    assert len(list((run / name).glob("*.mp4"))) == 1


def test_two_rank_fsdp_validates_samples_and_evaluates_like_one_process(tmp_path, fsdp2_killed):
    """Issue 22: run.val_every, sample_every and eval_every on 2 FSDP2 ranks (the killed run, at step 2),
    against one process on the weights and EMA of its step-2 checkpoint. ZeRO-3: in
    test_deepspeed_two_ranks_resume_on_one_rank_through_the_universal_checkpoint[zero3]."""
    ckpt = fsdp2_killed / "checkpoints" / f"step-{CHECKS_AT:06d}"
    _assert_periodic_checks_like_one_process(fsdp2_killed, tmp_path / "one_process", read_full(ckpt, "model"),
                                             read_full(ckpt, "ema"))


def test_global_batch_change_resumes_with_a_warning_naming_both_sizes(tmp_path, trainer_shards, fsdp2_killed):
    """2 fsdp ranks x batch 1 (global 2) resumed by 1 rank x batch 1 (global 1): allowed, with a warning
    that names the old and new sizes; the data position is kept in samples (the loader's own warning
    says whether that is exact or approximate)."""
    out = tmp_path / "resumed"
    shutil.copytree(fsdp2_killed, out)
    config = tiny_config(tmp_path / "c.yaml", trainer_shards[0], out, parallel={"strategy": "fsdp"},
                         data={"batch_size": 1}, run={"steps": 4, "ckpt_every": 2})
    r = _train(config, 1)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" in r.stderr and "global batch size changed from 2 to 1" in r.stderr
    assert "global batch size 2 → 1" in r.stderr
    assert sorted(step_log(out)) == [0, 1, 2, 3]


def _state(strategy: str, world: int, zero_stage: int = 2) -> dict:
    return {"strategy": strategy, "world_size": world, "config": {"parallel": {"zero_stage": zero_stage}}}


def test_deepspeed_and_torch_checkpoints_refuse_each_other_by_name(tmp_path):
    from trainer.checkpoint import check_resumable

    for saved, now in (("deepspeed", "fsdp"), ("ddp", "deepspeed")):
        with pytest.raises(RuntimeError, match=f"written by strategy '{saved}', this run uses '{now}'"):
            check_resumable(tmp_path, _state(saved, 2), now, 2, 2)


def test_fsdp_checkpoint_with_per_rank_ema_files_needs_its_own_world_size(tmp_path):
    """Checkpoints written before the EMA moved into DCP: model and optimizer would reshard, the EMA
    shards in ema-rank{r}.pt would not, so another world size or strategy is refused."""
    from trainer.checkpoint import check_resumable

    check_resumable(tmp_path, _state("fsdp", 2), "fsdp", 2)
    for now, world in (("fsdp", 1), ("ddp", 2)):
        with pytest.raises(RuntimeError, match="ema-rank"):
            check_resumable(tmp_path, _state("fsdp", 2), now, world)
    check_resumable(tmp_path, _state("ddp", 2), "fsdp", 1)  # replicas: anything goes


def test_checkpoint_from_before_dcp_still_loads_in_single(tmp_path):
    """single/ddp checkpoints written before DCP (model.pt, optimizer.pt, ema-rank{r}.pt, as the old
    SingleStrategy.save and save_checkpoint wrote them) load bitwise; the next save is DCP."""
    from torch import nn

    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.config import TrainConfig
    from trainer.distributed import init_distributed
    from trainer.ema import EMA
    from trainer.strategies.base import build_strategy

    cfg = TrainConfig()
    cfg.run.precision = "fp32"
    torch.manual_seed(0)
    old = build_strategy(cfg, init_distributed())
    old.setup(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    ema = EMA(old.local_params(), 0.5)
    old.model(torch.randn(5, 3)).square().sum().backward()
    old.optimizer_step()
    ema.update(old.local_params())
    ckpt = save_checkpoint(old, tmp_path, 1, ema=ema, loader_state=None, state={}, keep_last=2)
    shutil.rmtree(ckpt / "dcp")  # now rewrite it the way the code before DCP did
    torch.save(old.module.state_dict(), ckpt / "model.pt")
    torch.save(old.optimizer.state_dict(), ckpt / "optimizer.pt")
    torch.save(ema.state_dict(), ckpt / "ema-rank0.pt")

    torch.manual_seed(1)
    new = build_strategy(cfg, init_distributed())
    new.setup(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    ema2 = EMA(new.local_params(), 0.5)
    load_checkpoint(new, ckpt, ema=ema2)
    assert all(torch.equal(a, b) for a, b in zip(new.local_params(), old.local_params()))
    assert all(torch.equal(a, b) for a, b in zip(ema2.shadow, ema.shadow))
    assert not torch.equal(ema.shadow[0], old.local_params()[0])
    a, b = old.optimizer.state_dict()["state"], new.optimizer.state_dict()["state"]
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in ("exp_avg", "exp_avg_sq", "step"))
    again = save_checkpoint(new, tmp_path / "again", 1, ema=ema2, loader_state=None, state={}, keep_last=2)
    assert (again / "dcp").is_dir() and not (again / "model.pt").exists()


# ------------------------------------------------------------------ DeepSpeed: universal checkpoint
@pytest.fixture(scope="module")
def deepspeed_killed(tmp_path_factory, trainer_shards, standin_i3d_file):
    """(stage, nproc) -> out_dir of an nproc-rank ZeRO-<stage> run killed after its step-2 checkpoint
    (made on demand, once per module); the 2-rank ZeRO-3 one also validates, samples and evaluates."""
    made: dict[tuple[int, int], Path] = {}

    def get(stage: int, nproc: int = 2) -> Path:
        if (stage, nproc) not in made:
            tmp = tmp_path_factory.mktemp(f"zero{stage}-{nproc}rank")
            detector = str(standin_i3d_file) if (stage, nproc) == (3, 2) else None
            made[stage, nproc] = _killed_run(tmp, trainer_shards[0], "deepspeed", nproc, stage, detector)
        return made[stage, nproc]

    return get


def _dump(tmp: Path, killed: Path, shards: str, nproc: int, stage: int, name: str,
          then_train: bool = False) -> tuple[dict, Path, subprocess.CompletedProcess]:
    """(state gathered by tests/resume_dump.py after resuming a copy of `killed` on nproc ranks of
    ZeRO-<stage>, the copy's out_dir, the launch; with then_train the run then finishes there)."""
    out = tmp / name
    shutil.copytree(killed, out)
    config = _config(tmp / f"{name}.yaml", shards, out, "deepspeed", nproc, stage)
    dump = tmp / f"{name}.pt"
    r = run_in_group(torchrun_cmd("tests/resume_dump.py", nproc, "--config", str(config), "--out", str(dump),
                                  *(["--then-train"] if then_train else [])), TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    return torch.load(dump, weights_only=True), out, r


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["optim"]["steps"].tolist() == b["optim"]["steps"].tolist() == [2.0]  # AdamW step count
    for part in ("model", "ema", "optim"):
        assert sorted(a[part]) == sorted(b[part]) and len(a[part]) > 10, part
        bad = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not bad, f"{part} differs after the reshard: {bad[:5]}"
    assert int(a["step"]) == int(b["step"]) == 2
    assert any(not torch.equal(v, a["model"][k]) for k, v in a["ema"].items())  # EMA is not the weights


def _resume_deepspeed_elsewhere(tmp: Path, killed: Path, shards: str, saved: tuple[int, int], new: tuple[int, int],
                                reference: list[str]) -> dict:
    """`killed` (saved = (ranks, ZeRO stage)) resumed on new = (ranks, stage): converted automatically to
    DeepSpeed's universal checkpoint; the fp32 master weights, AdamW moments and EMA the new topology holds
    equal, bitwise, what the saved topology loads from the same checkpoint (gathered in full); the run
    finishes with the uninterrupted run's batch_digest at every step. Returns what the saved topology
    loads (tests/resume_dump.py)."""
    same, _, _ = _dump(tmp, killed, shards, *saved, "same")
    moved, out, r = _dump(tmp, killed, shards, *new, "moved", then_train=True)
    assert (checkpoint_root(out) / "step-000002" / "deepspeed_universal" / "zero").is_dir()
    _assert_same_state(same, moved)
    assert "[resume]" in r.stdout and "step-000002" in r.stdout
    assert _digests(out) == reference
    assert read_state(find_latest(out))["step"] == 4
    return same


@pytest.mark.parametrize("saved_stage,new_stage", [(2, 2), (3, 3), (2, 1)], ids=["zero2", "zero3", "zero2-to-zero1"])
def test_deepspeed_two_ranks_resume_on_one_rank_through_the_universal_checkpoint(
        tmp_path, trainer_shards, deepspeed_killed, reference_digests, saved_stage, new_stage):
    """A 2-rank ZeRO checkpoint resumed by 1 rank (and another stage). The 2-rank ZeRO-3 run also
    validated, sampled and evaluated at step 2: the same as one process on the weights and EMA its
    checkpoint holds (gathered in full here), folded into this test to reuse its launches."""
    killed = deepspeed_killed(saved_stage)
    saved = _resume_deepspeed_elsewhere(tmp_path, killed, trainer_shards[0], (2, saved_stage), (1, new_stage),
                                        reference_digests)
    if saved_stage == 3:
        _assert_periodic_checks_like_one_process(killed, tmp_path / "one_process", saved["model"], saved["ema"])


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_deepspeed_one_rank_resumes_on_two_ranks_through_the_universal_checkpoint(
        tmp_path, trainer_shards, deepspeed_killed, reference_digests, stage):
    """A 1-rank ZeRO checkpoint resumed by 2 ranks: the second rank has no saved RNG or loader entry of
    its own, and its EMA and optimizer pieces are cut from the one saved rank's full tensors."""
    _resume_deepspeed_elsewhere(tmp_path, deepspeed_killed(stage, nproc=1), trainer_shards[0], (1, stage),
                                (2, stage), reference_digests)


def test_deepspeed_across_the_zero3_boundary_is_refused_naming_the_way_on(tmp_path):
    """World size and ZeRO-1 <-> ZeRO-2 changes convert; ZeRO-1/2 <-> ZeRO-3 is refused before loading."""
    from trainer.checkpoint import check_resumable

    check_resumable(tmp_path, _state("deepspeed", 2, 2), "deepspeed", 1, 1)
    check_resumable(tmp_path, _state("deepspeed", 2, 3), "deepspeed", 1, 3)
    for saved, now in ((2, 3), (3, 1)):
        with pytest.raises(RuntimeError) as e:
            check_resumable(tmp_path, _state("deepspeed", 2, saved), "deepspeed", 1, now)
        msg = str(e.value)
        assert f"ZeRO-{saved} checkpoint, this run is ZeRO-{now}" in msg
        assert f"parallel.zero_stage={saved}" in msg and "run.init_from" in msg and "trainer.export" in msg
