"""trainer.checkpoint_manager on its own: a real single-process strategy around a small module, a real
EMA, a loader that only has a position, and the real checkpoint files; no Trainer."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from trainer.checkpoint_manager import MAX_ROLLBACKS_PER_CHECKPOINT, CheckpointManager, warm_start
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.ema import EMA
from trainer.metrics import Metrics
from trainer.step_control import TrainState
from trainer.strategies.base import build_strategy


class Position:
    """A loader reduced to what checkpoints keep of it: its position."""

    def __init__(self, pos: int = 0):
        self.pos = pos

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state) -> None:
        state = state[0] if isinstance(state, list) else state  # every rank's states, or one
        self.pos = state["pos"]


def _manager(tmp_path, *, async_save: bool = False, text_encoder: str = "", max_nonfinite: int = 2):
    cfg = TrainConfig()
    cfg.run.out_dir, cfg.run.precision, cfg.run.async_save = str(tmp_path / "run"), "fp32", async_save
    cfg.run.max_nonfinite_in_row = max_nonfinite
    strategy = build_strategy(cfg, DistEnv(0, 1, 0, torch.device("cpu"), None))
    torch.manual_seed(0)
    strategy.setup(nn.Linear(3, 2))
    ema = EMA(strategy.local_params(), 0.5)
    state = TrainState(text_encoder=text_encoder)
    metrics = Metrics(tmp_path / "run", enabled=True)
    return CheckpointManager(cfg, strategy, ema, Position(), state, metrics, rank=0)


def _set_weights(m: CheckpointManager, value: float) -> None:
    with torch.no_grad():
        for p in m.strategy.local_params():
            p.fill_(value)
    m.ema.update(m.strategy.local_params())


def test_a_new_run_writes_its_config_and_resumes_nothing(tmp_path):
    m = _manager(tmp_path)
    assert m.latest() is None
    assert m.resume(None) is None
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["run"]["out_dir"] == str(tmp_path / "run")


def test_save_then_resume_in_a_fresh_manager_restores_weights_ema_loader_and_counters(tmp_path, capsys):
    a = _manager(tmp_path, text_encoder="tiny-bert")
    _set_weights(a, 3.0)
    a.state.step, a.state.skipped_steps, a.state.rollbacks, a.loader.pos = 7, 2, 1, 42
    path = a.save()
    assert path.name == "step-000007" and a.latest() == path
    assert "[ckpt] saved" in capsys.readouterr().out

    b = _manager(tmp_path)  # another process: other weights, no encoder name of its own
    assert b.resume(b.latest()) == path
    assert (b.state.step, b.state.skipped_steps, b.state.rollbacks, b.loader.pos) == (7, 2, 1, 42)
    assert b.state.text_encoder == "tiny-bert"  # the checkpoint's, since the run named none
    assert all(torch.equal(x, y) for x, y in zip(b.strategy.local_params(), a.strategy.local_params()))
    assert all(torch.equal(x, y) for x, y in zip(b.ema.shadow, a.ema.shadow))
    assert f"[resume] {path} at step 7" in capsys.readouterr().out


def test_a_checkpoint_directory_without_its_state_file_is_not_complete(tmp_path):
    """trainer/checkpoint.py: trainer_state.json is written last, "so its presence marks a complete
    checkpoint". A step directory holding every other file (weights, EMA, RNG, loader) but no state file,
    even one `latest` names, is passed over by the resume, the rollback, the retention count and
    resolve_checkpoint (trainer.sample/evaluate/export --checkpoint)."""
    import shutil

    from trainer import checkpoint as ckpt

    m = _manager(tmp_path)
    _set_weights(m, 1.0)
    m.state.step, m.loader.pos = 2, 5
    good = m.save()
    root = good.parent
    partial = root / "step-000003"
    shutil.copytree(good, partial)
    (partial / ckpt.STATE_FILE).unlink()
    assert {p.name for p in partial.iterdir()} >= {"dcp", "rng-rank0.pt", "loader-rank0.json"}
    (root / ckpt.LATEST).write_text("step-000003\n")
    assert m.latest() == good
    assert ckpt.list_checkpoints(m.out_dir) == [good]
    assert ckpt.resolve_checkpoint(m.out_dir) == good
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(partial)
    fresh = _manager(tmp_path)
    assert fresh.resume(fresh.latest()) == good and fresh.state.step == 2
    _set_weights(m, float("nan"))
    m.state.step = 4
    assert m.rollback() == good
    # retention counts complete checkpoints only: keep_last 2 keeps step 2 beside step 5 (were the
    # partial directory counted, step 2 would be pruned for it)
    m.cfg.run.keep_last = 2
    m.state.step = 5
    newest = m.save()
    assert ckpt.list_checkpoints(m.out_dir) == [good, newest] and good.exists()


class _UsedAndUnused(nn.Module):
    """`unused` gets no gradient (like the null caption embedding before the first dropped caption)."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.used(x)


def test_a_parameter_never_stepped_has_no_adamw_state_after_the_load(tmp_path):
    """docs/trainer.md: "A parameter the saved run never stepped has no AdamW state and still has none
    after the load" (AdamW must not start it at step 1 of a schedule it never followed); the stepped
    ones load theirs."""
    def manager(seed: int) -> CheckpointManager:
        cfg = TrainConfig()
        cfg.run.out_dir, cfg.run.precision = str(tmp_path / "run"), "fp32"
        strategy = build_strategy(cfg, DistEnv(0, 1, 0, torch.device("cpu"), None))
        torch.manual_seed(seed)
        strategy.setup(_UsedAndUnused())
        return CheckpointManager(cfg, strategy, EMA(strategy.local_params(), 0.5), Position(), TrainState(),
                                 Metrics(tmp_path / "run", enabled=True), rank=0)

    a = manager(0)
    a.strategy.forward(torch.randn(4, 3)).square().sum().backward()
    a.strategy.optimizer_step()
    a.state.step = 1
    a.save()
    b = manager(1)
    b.resume(b.latest())
    for m in (a, b):
        stepped = {n for n, p in m.strategy.module.named_parameters() if p in m.strategy.optimizer.state}
        assert stepped == {"used.weight", "used.bias"}, stepped
    assert all(torch.equal(b.strategy.optimizer.state[p]["exp_avg"], a.strategy.optimizer.state[q]["exp_avg"])
               for p, q in zip(b.strategy.module.used.parameters(), a.strategy.module.used.parameters()))


def test_during_write_runs_before_the_checkpoint_is_renamed(tmp_path):
    m = _manager(tmp_path)
    m.state.step = 1
    seen = []
    m.save(during_write=lambda: seen.append((m.out_dir / "checkpoints" / "step-000001").exists()))
    assert seen == [False] and m.latest().name == "step-000001"


def test_a_background_save_becomes_the_latest_only_when_committed(tmp_path, capsys):
    m = _manager(tmp_path, async_save=True)
    m.state.step = 2
    path = m.save()
    assert "in the background" in capsys.readouterr().out
    m.poll()  # may or may not have committed yet; finish() must
    m.finish()
    assert m.latest() == path and (path / "trainer_state.json").is_file()
    m.finish()  # nothing in flight: a no-op


def test_rollback_restores_the_weights_but_keeps_the_event_counts(tmp_path, capsys):
    m = _manager(tmp_path)
    _set_weights(m, 1.0)
    m.state.step, m.loader.pos = 2, 5
    m.save()
    saved = [p.detach().clone() for p in m.strategy.local_params()]
    _set_weights(m, float("nan"))
    m.state.step, m.state.skipped_steps, m.loader.pos = 4, 2, 9
    assert m.rollback().name == "step-000002"
    assert (m.state.step, m.state.skipped_steps, m.state.rollbacks, m.loader.pos) == (2, 2, 1, 5)
    assert all(torch.equal(p, s) for p, s in zip(m.strategy.local_params(), saved))
    assert "rolled back to step-000002 (rollback #1)" in capsys.readouterr().out


def test_rollback_gives_up_after_the_limit_and_without_a_checkpoint(tmp_path):
    m = _manager(tmp_path)
    with pytest.raises(RuntimeError, match="no checkpoint .* to roll back to"):
        m.rollback()
    m.state.step = 2
    m.save()
    for _ in range(MAX_ROLLBACKS_PER_CHECKPOINT):
        m.state.step = 4
        m.rollback()
    m.state.step = 4
    with pytest.raises(RuntimeError, match=f"rolled back to \\S*step-000002 {MAX_ROLLBACKS_PER_CHECKPOINT} times"):
        m.rollback()


def _tiny_unet_config():
    from model.config import UNetConfig

    return UNetConfig(base_channels=16, channel_mults=[1, 2], num_res_blocks=1, image_size=8,
                      attention_resolutions=[4], head_dim=8, cond_dim=32, text_dim=32, groups=4)


def test_warm_start_puts_a_checkpoints_ema_into_a_bare_model(tmp_path, capsys):
    from model.unet import SpaceTimeUNet

    cfg = TrainConfig()
    cfg.model = _tiny_unet_config()
    cfg.run.out_dir, cfg.run.precision = str(tmp_path / "source"), "fp32"
    strategy = build_strategy(cfg, DistEnv(0, 1, 0, torch.device("cpu"), None))
    torch.manual_seed(0)
    strategy.setup(SpaceTimeUNet(cfg.model))
    ema = EMA(strategy.local_params(), 0.5)
    with torch.no_grad():
        for p in strategy.local_params():
            p.add_(1.0)
    ema.update(strategy.local_params())  # the EMA now differs from both the weights and a fresh model
    m = CheckpointManager(cfg, strategy, ema, Position(), TrainState(step=3), Metrics(tmp_path / "source", True), 0)
    source = m.save()

    torch.manual_seed(1)
    model = SpaceTimeUNet(cfg.model)
    warm_start(model, str(source), cfg.model, Metrics(tmp_path / "new", enabled=True))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(torch.equal(dict(model.named_parameters())[n].detach(), e) for n, e in zip(names, ema.shadow))
    assert "[init] model and EMA weights from" in capsys.readouterr().out


def test_warm_start_without_a_source_changes_nothing_and_a_missing_one_names_the_setting(tmp_path):
    from model.unet import SpaceTimeUNet

    cfg = _tiny_unet_config()
    metrics = Metrics(tmp_path / "m", enabled=True)
    torch.manual_seed(1)
    model = SpaceTimeUNet(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    warm_start(model, "", cfg, metrics)  # no run.init_from: untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="run.init_from=.*nowhere"):
        warm_start(model, str(tmp_path / "nowhere"), cfg, metrics)
