"""`run.callbacks`: classes named in the config are called by the real Trainer at the documented points,
a replaced batch is what trains, and a bad entry stops the run naming the entry."""

from __future__ import annotations

import pytest
import torch
from test_trainer_inprocess import _cfg, _trainer

from trainer.callbacks import Callback, load_callback


class Recorder(Callback):
    """Records every hook call (class-level, since the trainer builds it from its name); at step 0 it
    hands the trainer a NaN batch, which the NaN guard must then skip."""

    events: list[tuple] = []

    def on_step_start(self, trainer) -> None:
        self.events.append(("start", trainer.step))

    def on_batch(self, trainer, x: torch.Tensor) -> torch.Tensor:
        self.events.append(("batch", trainer.step, tuple(x.shape)))
        return torch.full_like(x, float("nan")) if trainer.step == 0 else x

    def before_optimizer_step(self, trainer, first_step: int) -> None:
        self.events.append(("before_optimizer_step", trainer.step, first_step))

    def during_checkpoint_write(self, trainer) -> None:
        root = trainer.out_dir / "checkpoints"
        name = f"step-{trainer.step:06d}"
        in_tmp = sorted(p.name.split(".tmp-")[0] for p in root.glob("step-*.tmp-*"))
        self.events.append(("write", trainer.step, in_tmp, (root / name).exists()))


class NotACallback:
    pass


def test_configured_callbacks_see_every_step_and_the_checkpoint_write_before_its_rename(tmp_path):
    Recorder.events.clear()
    cfg = _cfg(tmp_path, run={"steps": 4, "ckpt_every": 2, "callbacks": ["test_callbacks:Recorder"]})
    trainer = _trainer(cfg)
    assert trainer.train() == 0
    ev = Recorder.events
    assert [e for e in ev if e[0] == "start"] == [("start", s) for s in range(4)]
    assert [e[:2] for e in ev if e[0] == "batch"] == [("batch", s) for s in range(4)]
    assert ev[1][2] == (2, 3, 5, 8, 8)  # tiny_config: batch 2, 4 video + 1 image frame, 8x8
    assert [e for e in ev if e[0] == "before_optimizer_step"] == [
        ("before_optimizer_step", s, 0) for s in range(4)]
    # at the periodic save (step 2) and the final one (4): files in the temp dir, final name not there yet
    assert [e for e in ev if e[0] == "write"] == [("write", 2, ["step-000002"], False),
                                                  ("write", 4, ["step-000004"], False)]
    # the NaN batch the callback returned at step 0 is what the step trained on: skipped, not applied
    assert trainer.skipped_steps == 1


@pytest.mark.parametrize("spec, message", [
    ("no_colon_here", "must look like 'package.module:ClassName'"),
    ("no_such_module_xyz:Thing", "cannot import no_such_module_xyz"),
    ("test_callbacks:Missing", "test_callbacks has no Missing"),
    ("test_callbacks:NotACallback", "NotACallback is not a trainer.callbacks.Callback"),
])
def test_a_bad_callback_entry_is_an_error_naming_it(spec, message):
    with pytest.raises(ValueError, match="run.callbacks entry") as e:
        load_callback(spec)
    assert spec in str(e.value) and message in str(e.value)


def test_a_bad_callback_entry_stops_the_trainer_at_start(tmp_path):
    cfg = _cfg(tmp_path, run={"steps": 1, "callbacks": ["test_callbacks:Missing"]})
    with pytest.raises(ValueError, match="test_callbacks:Missing"):
        _trainer(cfg)
