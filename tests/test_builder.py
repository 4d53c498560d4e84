"""trainer.builder on its own: what a ready trainer is assembled from and in which order (settings
refused first, warm start only for a new run, the per-rank RNG streams seeded last for a new run and
restored by a resume, batch hooks and clip conditions chosen here so the step never asks). Built on
the tests' in-memory loader; nothing steps."""

from __future__ import annotations

import pytest
import torch
from test_trainer_inprocess import MemoryLoader, _cfg

from model.conditioning import measured_motion
from trainer.batches import StaticTextLength
from trainer.builder import build_parts, check_settings, text_encoder_name
from trainer.distributed import DistEnv
from trainer.seeding import seed_rank_streams

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = DistEnv(0, 1, 0, torch.device("cpu"), None)


def _factory(data_cfg, rank, world_size, train, **_):
    return MemoryLoader(data_cfg)


def _build(cfg):
    return build_parts(cfg, CPU, loader_factory=_factory)


def test_settings_the_loop_cannot_honour_are_refused_before_anything_is_built(tmp_path):
    cfg = _cfg(tmp_path, optim={"grad_accum": 0})
    with pytest.raises(ValueError, match="optim.grad_accum must be >= 1"):
        check_settings(cfg)
    cfg = _cfg(tmp_path / "b", optim={"grad_accum": 0})
    with pytest.raises(ValueError, match="optim.grad_accum must be >= 1"):
        _build(cfg)
    assert not (tmp_path / "b" / "run" / "config.yaml").exists()  # refused before the run was started


def test_a_new_run_is_seeded_per_rank_after_the_model_and_starts_at_step_zero(tmp_path):
    cfg = _cfg(tmp_path, run={"seed": 7})
    parts = _build(cfg)
    assert parts.resumed_from is None and parts.state.step == 0
    assert (tmp_path / "run" / "config.yaml").is_file()
    drawn = torch.rand(4)
    seed_rank_streams(7, rank=0)
    assert torch.equal(drawn, torch.rand(4))  # nothing after the seeding drew from the stream


def test_the_step_gets_its_hooks_and_conditions_from_here(tmp_path):
    plain = _build(_cfg(tmp_path / "plain"))
    assert [type(h).__name__ for h in plain.batch_hooks] == ["_FirstBatchFlops"]
    assert plain.conditioning.from_clip == () and plain.conditioning.caption_dropout == 0.5
    motion = _build(_cfg(tmp_path / "motion", model={"motion_conditioning": True}))
    assert motion.conditioning.from_clip == (measured_motion,)
    compiled = _build(_cfg(tmp_path / "compiled", run={"compile": True, "compile_backend": "eager"}))
    assert isinstance(compiled.batch_hooks[0], StaticTextLength) and compiled.compiled is not None


def test_a_rerun_resumes_instead_of_warm_starting(tmp_path, capsys):
    cfg = _cfg(tmp_path, run={"init_from": str(tmp_path / "missing.safetensors")})
    with pytest.raises(FileNotFoundError, match="run.init_from="):
        _build(cfg)  # a new run warm-starts (and this source does not exist)
    cfg.run.init_from = ""
    parts = _build(cfg)
    parts.state.step, parts.state.text_encoder = 3, "enc"
    saved = parts.checkpoints.save()
    weights = [p.detach().clone() for p in parts.strategy.local_params()]

    cfg.run.init_from = str(tmp_path / "missing.safetensors")  # ignored: the run resumes its own checkpoint
    again = _build(cfg)
    assert again.resumed_from == saved and again.state.step == 3 and again.state.text_encoder == "enc"
    assert all(torch.equal(a, b) for a, b in zip(again.strategy.local_params(), weights))
    assert f"[resume] {saved} at step 3" in capsys.readouterr().out


def test_the_text_encoder_is_the_configured_one_else_the_shards(tmp_path):
    cfg = _cfg(tmp_path)

    class Indexed:
        class index:
            encoder_name = "from-index"

    assert text_encoder_name(cfg, Indexed()) == "from-index"
    cfg.run.text_encoder = "configured"
    assert text_encoder_name(cfg, Indexed()) == "configured"
    cfg.run.text_encoder = ""
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "index.json").write_text('{"encoder": {"name": "from-json"}}')
    cfg.data.shards = str(tmp_path / "shards")
    assert text_encoder_name(cfg, object()) == "from-json"


def test_the_trainer_takes_ready_parts(tmp_path):
    from trainer.loop import Trainer

    cfg = _cfg(tmp_path, run={"steps": 1, "ckpt_every": 0})
    parts = _build(cfg)
    trainer = Trainer(cfg, parts=parts)
    assert trainer.strategy is parts.strategy and trainer.checkpoints is parts.checkpoints
    assert trainer.train() == 0 and trainer.step == 1 == parts.state.step
    trainer.close()


def test_the_step_reads_no_model_option():
    """The step gets batch hooks and clip conditions from here; it must not grow `if cfg.model.x:`
    branches again (issue 22)."""
    import inspect

    from trainer.loop import Trainer

    source = inspect.getsource(Trainer.train_step)
    assert "cfg.model" not in source and "motion" not in source and "compiled" not in source
