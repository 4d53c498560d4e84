"""Issue 12: DeepSpeed's internals behind one version-checked module (trainer/strategies/deepspeed_compat.py).

An installed DeepSpeed outside the tested range warns, naming both versions; an internal that is
missing raises a RuntimeError naming the symbol, the installed version and the tested range (instead
of an AttributeError or ImportError in the middle of a step); the tested version resolves everything
quietly. In-process and engine-free (fake ZeRO optimizers); the real engine paths are exercised by
tests/test_strategies_dist.py and tests/test_elastic_checkpoint.py.
"""

from __future__ import annotations

import argparse
import logging
import math
import pickle
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from trainer.strategies import deepspeed_compat as compat


@pytest.fixture
def deepspeed(monkeypatch):
    """The real deepspeed module, imported on CPU, with the once-per-version check reset."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import deepspeed

    monkeypatch.setattr(compat._RANGE, "checked", None)
    return deepspeed


class Zero12Optimizer:
    """Just the surface the compat functions use of DeepSpeed's ZeRO-1/2 optimizer."""
    clip_grad = 0.0
    loss_scale = 2.0

    def __init__(self, norm: float):
        self.norm = norm

    def scaled_global_norm(self, norm_type=2):
        return torch.tensor(self.norm)


class Zero3Optimizer:
    """Just the surface the compat functions use of DeepSpeed's ZeRO-3 optimizer."""
    clip_grad = 0.0
    loss_scale = 1.0

    def _get_norm_groups(self):
        return [torch.tensor(3.0), torch.tensor(4.0)]


def _names_the_versions(message: str, version: str) -> None:
    assert f"DeepSpeed {version}" in message and compat.TESTED in message and "deepspeed_compat.py" in message


# ------------------------------------------------------------------ the version check
@pytest.mark.parametrize("version", ["0.20.1", "0.18.9", "1.0.0", "not-a-version"])
def test_an_untested_version_warns_once_naming_installed_and_tested(deepspeed, monkeypatch, version):
    monkeypatch.setattr(deepspeed, "__version__", version)
    with pytest.warns(compat.DeepSpeedVersionWarning) as caught:
        assert compat.check_version() == version
    assert len(caught) == 1
    _names_the_versions(str(caught[0].message), version)
    assert f"pip install 'deepspeed{compat.TESTED}'" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_version()  # once per process and version
        compat.checkpoint_record_classes()  # resolving internals does not warn again either


def test_first_use_of_an_internal_checks_the_version(deepspeed, monkeypatch):
    monkeypatch.setattr(deepspeed, "__version__", "0.21.0")
    with pytest.warns(compat.DeepSpeedVersionWarning, match=r"DeepSpeed 0\.21\.0 is installed"):
        compat.global_grad_norm(Zero12Optimizer(3.0), 2)


def test_the_tested_range():
    assert compat.TESTED == ">=0.19,<0.20"
    for version in ("0.19.0", "0.19.8", "0.19.8+cpu", "0.19.9.dev0"):
        assert compat.is_tested(version), version
    for version in ("0.18.9", "0.20.0", "0.20.0rc1", "1.19.0", "", "unknown"):
        assert not compat.is_tested(version), version


def test_the_tested_range_is_the_pin_in_pyproject():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    pins = [Requirement(r) for r in re.findall(r'"(deepspeed\b[^"]*)"', text)]
    assert [r.specifier for r in pins] == [SpecifierSet(compat.TESTED)]


# ------------------------------------------------------------------ a missing internal
def test_a_missing_function_is_named_with_both_versions(deepspeed, monkeypatch):
    import deepspeed.runtime.utils

    monkeypatch.delattr(deepspeed.runtime.utils, "is_invalid_grad_norm")
    with pytest.raises(RuntimeError) as e:
        compat.global_grad_norm(Zero12Optimizer(3.0), 2)
    assert isinstance(e.value, compat.DeepSpeedInternalMissing)
    message = str(e.value)
    assert "has no deepspeed.runtime.utils.is_invalid_grad_norm" in message
    _names_the_versions(message, deepspeed.__version__)


def test_a_missing_module_is_named(deepspeed, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed.checkpoint.ds_to_universal", None)  # import raises
    with pytest.raises(compat.DeepSpeedInternalMissing, match=r"has no deepspeed\.checkpoint\.ds_to_universal\.main"):
        compat.ds_to_universal("src", "dst")


def test_a_missing_optimizer_method_is_named_and_nothing_is_patched(deepspeed):
    class Renamed:  # a ZeRO-1/2 optimizer whose norm method was renamed
        clip_grad = 0.0

        def global_norm(self):
            return torch.tensor(1.0)

    opt = Renamed()
    with pytest.raises(compat.DeepSpeedInternalMissing, match=r"has no Renamed\.scaled_global_norm"):
        with compat.invalid_grad_norm(opt, 2):
            pass
    assert not hasattr(opt, "scaled_global_norm")  # a patch of a method step() no longer calls would be a no-op
    with pytest.raises(compat.DeepSpeedInternalMissing, match=r"has no Zero12Optimizer\._get_norm_groups"):
        compat.global_grad_norm(Zero12Optimizer(1.0), 3)
    with pytest.raises(compat.DeepSpeedInternalMissing, match=r"has no object\.clip_grad"):
        compat.set_clip(object(), 1.0)  # setting it would silently stop clipping


def test_missing_parameter_internals_are_named(deepspeed):
    plain = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(compat.DeepSpeedInternalMissing, match=r"has no ZeRO-3 parameter\.ds_tensor"):
        compat.zero3_layout(plain)
    with pytest.raises(compat.DeepSpeedInternalMissing, match=r"has no ZeRO-1/2 parameter\._hp_mapping"):
        compat.fragment(plain)
    plain._hp_mapping = None  # linked, but this rank owns none of it
    assert compat.fragment(plain) is None and compat.fragment_span(plain) is None
    assert compat.full_numel(plain, 2) == 3


def test_the_shm_op_skip_only_logs_when_its_registry_moved(deepspeed, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "deepspeed.ops", None)
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        compat.skip_shm_op_build()  # a slow start-up, not an error
    assert "has no deepspeed.ops.__compatible_ops__" in caplog.text and compat.TESTED in caplog.text


# ------------------------------------------------------------------ the tested version
def test_the_installed_version_is_tested_and_quiet(deepspeed):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.check_version() == deepspeed.__version__
    assert compat.is_tested(deepspeed.__version__)


def test_grad_norms_and_the_forced_overflow(deepspeed):
    assert compat.global_grad_norm(Zero12Optimizer(3.0), 2) == 1.5  # divided by the loss scale 2
    assert compat.global_grad_norm(Zero12Optimizer(float("nan")), 1) == math.inf
    assert compat.global_grad_norm(Zero3Optimizer(), 3) == pytest.approx(5.0)  # groups 3 and 4
    opt = Zero3Optimizer()
    compat.set_clip(opt, 0.5)
    assert opt.clip_grad == 0.5
    with compat.invalid_grad_norm(opt, 3):
        assert compat.global_grad_norm(opt, 3) == math.inf
    assert compat.global_grad_norm(opt, 3) == pytest.approx(5.0)  # the class's method again
    opt = Zero12Optimizer(3.0)
    with compat.invalid_grad_norm(opt, 2):
        assert math.isnan(float(opt.scaled_global_norm()))
    assert float(opt.scaled_global_norm()) == 3.0


def _record_files(deepspeed, folder: Path) -> tuple[Path, Path, Path]:
    """(good, bad, unknown): DeepSpeed records only; a non-DeepSpeed class; a DeepSpeed class outside
    the allow-list (e.g. from a newer release)."""
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    folder.mkdir(parents=True, exist_ok=True)
    good, bad, unknown = folder / "good.pt", folder / "bad.pt", folder / "unknown.pt"
    torch.save({"stage": ZeroStageEnum.gradients, "addr": fragment_address(numel=3, start=1),
                "t": torch.arange(3)}, good)
    torch.save({"args": argparse.Namespace(x=1)}, bad)
    torch.save({"config": deepspeed.runtime.zero.config.DeepSpeedZeroConfig()}, unknown)
    return good, bad, unknown


def test_checkpoint_records_load_weights_only_and_nothing_else(deepspeed, tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    classes = compat.checkpoint_record_classes()
    assert ZeroStageEnum in classes and fragment_address in classes and len(classes) == 4
    good, bad, unknown = _record_files(deepspeed, tmp_path)
    original = torch.load
    state = compat.load_weights_only(good)
    assert state["stage"] == ZeroStageEnum.gradients and state["addr"].start == 1
    with pytest.raises(pickle.UnpicklingError) as e:
        compat.load_weights_only(bad)
    assert "deepspeed_compat" not in str(e.value)
    with pytest.raises(pickle.UnpicklingError, match="checkpoint_record_classes"):
        compat.load_weights_only(unknown)
    assert torch.load is original  # nothing process-wide was swapped


def test_an_engine_reads_its_checkpoint_files_weights_only(deepspeed, tmp_path):
    from types import SimpleNamespace

    good, bad, _ = _record_files(deepspeed, tmp_path)
    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace(load=lambda path, map_location=None: "unsafe"))
    other = SimpleNamespace(checkpoint_engine=SimpleNamespace(load=lambda path, map_location=None: "unsafe"))
    compat.load_checkpoints_weights_only(engine)
    assert engine.checkpoint_engine.load(str(good), map_location="cpu")["t"].tolist() == [0, 1, 2]
    with pytest.raises(pickle.UnpicklingError):
        engine.checkpoint_engine.load(str(bad))
    assert other.checkpoint_engine.load(str(bad)) == "unsafe"  # only that engine


def test_a_universal_load_checks_its_files_and_gives_the_flag_back(deepspeed, tmp_path):
    from types import SimpleNamespace

    engine = SimpleNamespace(_config=SimpleNamespace(load_universal_checkpoint=True))  # set by the user
    good, _, _ = _record_files(deepspeed, tmp_path / "clean" / "zero" / "w")
    for f in good.parent.glob("*.pt"):
        if f != good:
            f.unlink()
    with compat.universal_checkpoint_loading(engine, None):
        assert engine._config.load_universal_checkpoint is False
    assert engine._config.load_universal_checkpoint is True  # its previous value, not False
    engine._config.load_universal_checkpoint = False
    with compat.universal_checkpoint_loading(engine, tmp_path / "clean"):
        assert engine._config.load_universal_checkpoint is True
    assert engine._config.load_universal_checkpoint is False
    _record_files(deepspeed, tmp_path / "tampered" / "zero" / "w")
    with pytest.raises(pickle.UnpicklingError):
        with compat.universal_checkpoint_loading(engine, tmp_path / "tampered"):
            raise AssertionError("a folder with an unsafe file must not reach DeepSpeed's loader")
    assert engine._config.load_universal_checkpoint is False


def test_the_converter_runs_weights_only_in_its_own_process(deepspeed, tmp_path):
    """DeepSpeed's converter calls torch.load(weights_only=False) itself; in its process every load is
    weights_only, so a checkpoint holding a pickled object fails there, naming the class."""
    original = torch.load
    src = tmp_path / "src"
    src.mkdir()
    torch.save({"args": argparse.Namespace(x=1)}, src / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(RuntimeError, match=r"Weights only load failed[\s\S]*argparse\.Namespace"):
        compat.ds_to_universal(str(src), str(tmp_path / "dst"))
    torch.save({"config": deepspeed.runtime.zero.config.DeepSpeedZeroConfig()}, src / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(pickle.UnpicklingError, match="checkpoint_record_classes"):
        compat.ds_to_universal(str(src), str(tmp_path / "dst"))
    assert torch.load is original


def test_a_converter_that_changed_its_arguments_is_named(deepspeed, tmp_path, monkeypatch):
    """Were DeepSpeed's ds_to_universal to drop or rename an argument we pass (or require a new one),
    its own parser rejects the command line: DeepSpeedToolChanged naming the arguments, not an
    AttributeError deep inside the conversion."""
    monkeypatch.setattr(compat, "CONVERTER_ARGS", [*compat.CONVERTER_ARGS, "--merge_workers_renamed", "1"])
    with pytest.raises(compat.DeepSpeedToolChanged) as e:
        compat.ds_to_universal(str(tmp_path / "src"), str(tmp_path / "dst"))
    assert isinstance(e.value, compat.DeepSpeedInternalMissing)
    assert "--merge_workers_renamed" in str(e.value) and "CONVERTER_ARGS" in str(e.value)


def test_the_converter_process_refuses_to_run_without_forced_weights_only(deepspeed, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    assert compat._convert_in_this_process(["--input_folder", "a", "--output_folder", "b"]) == 1


class CountingZero12Optimizer(Zero12Optimizer):
    calls = 0

    def scaled_global_norm(self, norm_type=2):
        CountingZero12Optimizer.calls += 1
        return super().scaled_global_norm(norm_type)


class FakeEngine:
    """An engine's step() as far as the strategy sees it: asks the optimizer for the norm and skips
    on a non-finite one, counting the skip (or, `broken`, applies the step anyway)."""

    def __init__(self, optimizer, broken: bool = False):
        self.optimizer, self.broken = optimizer, broken
        self.skipped_steps, self._applied, self.norms = 0, False, []

    def step(self):
        norm = float(self.optimizer.scaled_global_norm())
        self.norms.append(norm)
        self._applied = math.isfinite(norm) or self.broken
        if not self._applied:
            self.skipped_steps += 1

    def was_step_applied(self) -> bool:
        return self._applied


def _strategy(engine, optimizer):
    from trainer.strategies.deepspeed import DeepSpeedStrategy

    s = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # the step methods only; setup needs a process group
    s.engine, s.optimizer, s.stage, s._norm_parts = engine, optimizer, 2, None
    return s


def test_the_step_reuses_the_norm_the_clip_computed(deepspeed):
    CountingZero12Optimizer.calls = 0
    opt = CountingZero12Optimizer(3.0)
    engine = FakeEngine(opt)
    s = _strategy(engine, opt)
    assert s.clip_grad_norm(1.0) == 1.5 and opt.clip_grad == 1.0
    s.optimizer_step()
    assert CountingZero12Optimizer.calls == 1 and engine.norms == [3.0]  # computed once, used by the step
    assert "scaled_global_norm" not in vars(opt)  # the class's method again
    s.optimizer_step()  # no clip before it: the engine computes the norm itself
    assert CountingZero12Optimizer.calls == 2


def test_a_skipped_step_is_verified_and_an_applied_one_raises(deepspeed):
    opt = Zero12Optimizer(3.0)
    s = _strategy(FakeEngine(opt), opt)
    s.clip_grad_norm(1.0)
    s.skip_step()
    assert s.engine.skipped_steps == 1 and not s.engine.was_step_applied()
    broken = _strategy(FakeEngine(opt, broken=True), opt)  # a DeepSpeed whose step ignores the NaN norm
    with pytest.raises(compat.NonFiniteStepApplied, match=r"skipped_steps 0 -> 0"):
        broken.skip_step()
    with pytest.raises(compat.DeepSpeedInternalMissing, match=r"has no DeepSpeedEngine\.skipped_steps"):
        compat.skipped_steps(object())


def test_background_writes_go_through_the_checkpoint_engine_only_inside_the_context(deepspeed):
    from types import SimpleNamespace

    written, direct, failed = [], [], []

    def copy_scripts(save_path):
        raise OSError(28, "No space left on device")

    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace(save=lambda state_dict, path: direct.append(path)),
                             _copy_recovery_script=copy_scripts)
    with compat.checkpoint_writes_through(engine, lambda obj, path: written.append((obj, path)), failed.append):
        engine.checkpoint_engine.save(state_dict={"w": 1}, path="a.pt")  # DeepSpeed passes keywords
        engine._copy_recovery_script("ckpt")  # a full disk on rank 0: reported, not raised inside the engine
    engine.checkpoint_engine.save({"w": 2}, "b.pt")
    assert written == [({"w": 1}, "a.pt")] and direct == ["b.pt"]
    assert [e.errno for e in failed] == [28]
    with pytest.raises(OSError):
        engine._copy_recovery_script("ckpt")  # outside the context: DeepSpeed's own again
    with pytest.raises(compat.DeepSpeedInternalMissing, match=r"has no DeepSpeedEngine\.checkpoint_engine"):
        with compat.checkpoint_writes_through(SimpleNamespace(), print, print):
            pass
