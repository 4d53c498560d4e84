"""Every DeepSpeed internal the trainer relies on, in one version-checked place.

trainer/strategies/deepspeed.py uses DeepSpeed's public API (`deepspeed.initialize`,
`init_distributed`, `get_accelerator`, the engine's forward/backward/step/save_checkpoint/
load_checkpoint) and this module. Everything beyond that lives here: ZeRO optimizer methods and
attributes, ZeRO parameter attributes, the universal-checkpoint converter, the classes DeepSpeed
pickles into its checkpoint files, and our few overrides, each scoped to one engine or optimizer
object and one call, and restored to what was there before (weights_only loading, background
checkpoint writes, the norm step() uses, the skipped shared-memory op build). Nothing here replaces
a function of torch or DeepSpeed process-wide. So a DeepSpeed upgrade breaks here, and says so:
- an installed version outside `TESTED` warns once per process (`DeepSpeedVersionWarning`), naming the
  installed and the tested versions;
- an internal that moved or vanished raises `DeepSpeedInternalMissing` (a RuntimeError) naming the
  symbol, the installed version and `TESTED`, where it is first needed, instead of an AttributeError
  or ImportError in the middle of a step; a DeepSpeed tool that no longer takes our arguments (the
  universal-checkpoint converter) raises `DeepSpeedToolChanged`, one of those;
- a step the trainer asked DeepSpeed to skip (a non-finite loss or gradient) that DeepSpeed applied
  anyway raises `NonFiniteStepApplied` at once.

On an upgrade: run the DeepSpeed tests (docs/strategies.md, "DeepSpeed upgrades"), adapt what they
name here, then move `TESTED`. Nothing here imports DeepSpeed at module import (it is slow, and
setup() must set DS_ACCELERATOR first); the version is checked on first use.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from common.tested_range import TestedRange, in_range

log = logging.getLogger(__name__)

TESTED = ">=0.19,<0.20"  # the DeepSpeed releases this module was checked against (CPU/gloo tests)


class DeepSpeedVersionWarning(UserWarning):
    """The installed DeepSpeed is outside TESTED."""


_RANGE = TestedRange(TESTED, DeepSpeedVersionWarning, lambda version: (
    f"DeepSpeed {version} is installed, but this trainer is tested with deepspeed{TESTED}: the DeepSpeed "
    f"internals it uses (trainer/strategies/deepspeed_compat.py) may have changed. Install a tested version "
    f"(pip install 'deepspeed{TESTED}') or see docs/strategies.md, 'DeepSpeed upgrades'"))


class DeepSpeedInternalMissing(RuntimeError):
    """A DeepSpeed internal this module uses is not there in the installed version."""


class DeepSpeedToolChanged(DeepSpeedInternalMissing):
    """A DeepSpeed command-line tool we run (ds_to_universal) rejects the arguments we give it."""


class NonFiniteStepApplied(RuntimeError):
    """DeepSpeed applied an optimizer step that the trainer had it skip (non-finite loss or gradient)."""


# ------------------------------------------------------------------ version and lookup
def installed_version() -> str:
    import deepspeed

    return str(deepspeed.__version__)


def is_tested(version: str) -> bool:
    """Whether `version` lies in TESTED (local builds and pre-releases of a tested release count)."""
    return in_range(version, TESTED)


def check_version() -> str:
    """The installed DeepSpeed version; warns (once per version) when it is outside TESTED."""
    return _RANGE.check(installed_version())


def missing(what: str, cause: BaseException | None = None) -> DeepSpeedInternalMissing:
    """The error for a DeepSpeed internal `what` (a dotted name) that is not where we expect it."""
    try:
        version = installed_version()
    except ImportError:
        version = "(not importable)"
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return DeepSpeedInternalMissing(
        f"DeepSpeed {version} has no {what}{detail}; this trainer uses that internal and is tested with "
        f"deepspeed{TESTED}. Install a tested version (pip install 'deepspeed{TESTED}') or adapt "
        f"trainer/strategies/deepspeed_compat.py to this one")


def symbol(module: str, name: str) -> Any:
    """`module.name` from DeepSpeed (after the version check), or DeepSpeedInternalMissing naming it."""
    check_version()
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise missing(f"{module}.{name}", e) from e


def attribute(obj: Any, name: str, owner: str | None = None) -> Any:
    """`obj.name` of a DeepSpeed object, or DeepSpeedInternalMissing naming `owner.name` (owner: the
    object's class unless given)."""
    try:
        return getattr(obj, name)
    except AttributeError as e:
        raise missing(f"{owner or type(obj).__name__}.{name}", e) from e


# ------------------------------------------------------------------ start-up
def skip_shm_op_build() -> None:
    """DeepSpeed builds a C++ shared-memory all-reduce op when its comm backend starts; only inference
    uses it, and building it costs about a minute on a small CPU machine. Mark it unavailable. Not
    fatal when the registry moved: the build is slow but harmless."""
    try:
        ops = importlib.import_module("deepspeed.ops")
        ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError) as e:
        log.warning("%s; start-up will build the unused shared-memory op (slow, harmless)",
                    missing("deepspeed.ops.__compatible_ops__", e))


# ------------------------------------------------------------------ scoped overrides
@contextlib.contextmanager
def _overridden(obj: Any, name: str, value: Any, owner: str | None = None) -> Iterator[None]:
    """`obj.name = value` for the duration of the block, on this one object; afterwards exactly what
    was there before (the object's own previous value, or none, so the class's method shows through
    again). The attribute must exist: overriding one DeepSpeed no longer reads would do nothing."""
    attribute(obj, name, owner)
    own = vars(obj)
    had_own, previous = name in own, own.get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)


# ------------------------------------------------------------------ checkpoint files
def checkpoint_record_classes() -> list[type]:
    """The plain DeepSpeed records its checkpoint files pickle: the ZeRO stage enum, the loss
    scalers and ZeRO-1/2 fragment addresses. The only classes a weights_only load allows."""
    return [symbol("deepspeed.runtime.zero.config", "ZeroStageEnum"),
            symbol("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
            symbol("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
            symbol("deepspeed.utils.tensor_fragment", "fragment_address")]


def allow_checkpoint_records() -> list[type]:
    """Registers checkpoint_record_classes() with torch's weights_only unpickler (torch's own API for
    this; once, and never withdrawn, so concurrent loads in other threads see one fixed allow-list
    rather than one that a finishing `safe_globals` block takes away mid-load). Returns them."""
    allowed = checkpoint_record_classes()
    torch.serialization.add_safe_globals(allowed)
    return allowed


def _unsafe_file_error(e: pickle.UnpicklingError) -> pickle.UnpicklingError:
    return pickle.UnpicklingError(
        f"{e}\n\nA DeepSpeed checkpoint file holds a class outside checkpoint_record_classes() in "
        f"trainer/strategies/deepspeed_compat.py (DeepSpeed {installed_version()}, tested with "
        f"deepspeed{TESTED}). If it is a plain record of a newer DeepSpeed, add it there.")


def load_weights_only(path, map_location=None) -> Any:
    """torch.load(path, weights_only=True) allowing the DeepSpeed records; a DeepSpeed class that is not
    allowed is named (a new DeepSpeed may pickle a record we do not know; a tampered file may name
    anything)."""
    allow_checkpoint_records()
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "deepspeed" not in str(e):
            raise
        raise _unsafe_file_error(e) from e


def load_checkpoints_weights_only(engine) -> None:
    """Make this engine read its checkpoint files with torch.load(weights_only=True), allowing only
    checkpoint_record_classes(): its checkpoint engine's `load` (DeepSpeed's pluggable read, which its
    own code calls with weights_only=False) is replaced on this engine object, for its lifetime."""
    ckpt_engine = attribute(engine, "checkpoint_engine", "DeepSpeedEngine")
    attribute(ckpt_engine, "load")
    ckpt_engine.load = lambda path, map_location=None: load_weights_only(path, map_location=map_location)


def verify_weights_only(folder: str | Path) -> None:
    """Every .pt file under `folder` loads with weights_only=True (load_weights_only), or this raises.

    DeepSpeed's universal-checkpoint loading reads the per-parameter files with its own
    torch.load(weights_only=False) calls, past the checkpoint engine; rather than swap torch.load for
    the whole process while it runs, each file is checked first. (A file replaced between the check
    and DeepSpeed's read, by someone writing into the run's checkpoint directory during the resume,
    is not caught.)"""
    for path in sorted(Path(folder).rglob("*.pt")):
        load_weights_only(path, map_location="cpu")


@contextlib.contextmanager
def checkpoint_writes_through(engine, save, failed) -> Iterator[None]:
    """For the duration: the engine's checkpoint engine hands each file to `save(obj, path)` instead
    of calling torch.save (`checkpoint_engine.save(state_dict, path)` is DeepSpeed's pluggable write,
    the one its Nebula and NVMe engines replace; run.async_save hands it to a writer thread), and the
    one other file it writes, rank 0's copy of the recovery scripts (`_copy_recovery_script`), hands
    its exception to `failed(error)` instead of raising it between the engine's barriers (a full disk
    fails it on rank 0 only: the other ranks would wait at the engine's last barrier forever)."""
    ckpt_engine = attribute(engine, "checkpoint_engine", "DeepSpeedEngine")
    copy_scripts = attribute(engine, "_copy_recovery_script", "DeepSpeedEngine")

    def copy_scripts_or_report(save_path) -> None:
        try:
            copy_scripts(save_path)
        except Exception as e:
            failed(e)

    with (_overridden(ckpt_engine, "save", lambda state_dict, path: save(state_dict, path)),
          _overridden(engine, "_copy_recovery_script", copy_scripts_or_report)):
        yield


# ds_to_universal's command line: everything but the folders (its defaults: strict, temp folder removed)
CONVERTER = "deepspeed.checkpoint.ds_to_universal"
CONVERTER_ARGS = ["--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
EXIT_TOOL_CHANGED, EXIT_UNSAFE_FILE = 3, 4  # the converter process's exit codes for its two named errors


def ds_to_universal(src: str, dst: str) -> None:
    """DeepSpeed's universal-checkpoint converter (its CLI: its own argument parser and main), run in a
    process of its own in which every torch.load is weights_only (TORCH_FORCE_WEIGHTS_ONLY_LOAD, set
    for that process only) with the DeepSpeed records allowed: the converter calls torch.load itself,
    and nothing in this process is patched for it. DeepSpeedToolChanged when the converter no longer
    takes our arguments; pickle.UnpicklingError naming the class for a file holding anything else."""
    for name in ("main", "parse_arguments"):
        symbol(CONVERTER, name)  # missing here: DeepSpeedInternalMissing now, not in the child
    argv = ["--input_folder", str(src), "--output_folder", str(dst), *CONVERTER_ARGS]
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p),
           "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    r = subprocess.run([sys.executable, "-m", "trainer.strategies.deepspeed_compat", *argv], env=env,
                       capture_output=True, text=True)
    tail = (r.stdout + r.stderr)[-3000:]
    if r.returncode == EXIT_TOOL_CHANGED:
        raise DeepSpeedToolChanged(
            f"DeepSpeed {installed_version()}'s {CONVERTER} rejects the arguments {argv} (tested with "
            f"deepspeed{TESTED}); adapt CONVERTER_ARGS in trainer/strategies/deepspeed_compat.py:\n{tail}")
    if r.returncode == EXIT_UNSAFE_FILE:
        raise pickle.UnpicklingError(f"{CONVERTER} {src}: {tail}")
    if r.returncode != 0:
        raise RuntimeError(f"{CONVERTER} {src} -> {dst} failed (exit {r.returncode}):\n{tail}")


def _convert_in_this_process(argv: list[str]) -> int:
    """The converter process (`python -m trainer.strategies.deepspeed_compat ARGS`): parse ARGS with
    DeepSpeed's own parser (sys.argv is this process's own command line), then convert."""
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") != "1":
        print("the converter process runs with TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 (use ds_to_universal())",
              file=sys.stderr)
        return 1
    allow_checkpoint_records()
    parse, main = symbol(CONVERTER, "parse_arguments"), symbol(CONVERTER, "main")
    sys.argv = [CONVERTER, *argv]
    try:
        args = parse()
    except SystemExit as e:  # argparse: an argument it does not know, or one it requires and we lack
        return 0 if e.code in (0, None) else EXIT_TOOL_CHANGED
    try:
        main(args)
    except pickle.UnpicklingError as e:
        if "deepspeed" not in str(e):
            raise
        print(_unsafe_file_error(e), file=sys.stderr)
        return EXIT_UNSAFE_FILE
    return 0


@contextlib.contextmanager
def universal_checkpoint_loading(engine, folder: str | Path | None) -> Iterator[None]:
    """engine.load_checkpoint inside reads the universal checkpoint in `folder` (None: a plain one).
    The engine config's flag (read by load_checkpoint and the ZeRO optimizer) is set for the block
    and given back its previous value; a universal folder's files are checked weights_only first."""
    config = attribute(engine, "_config", "DeepSpeedEngine")
    if folder is not None:
        verify_weights_only(folder)
    with _overridden(config, "load_universal_checkpoint", folder is not None):
        yield


# ------------------------------------------------------------------ fp32 master weights
class Zero3Layout(NamedTuple):
    """How ZeRO-3 partitions one parameter: `partition_numel` elements per rank (padded, the same on
    every rank), `numel` and `shape` of the full parameter, `device` of the local partition."""
    partition_numel: int
    numel: int
    shape: torch.Size
    device: torch.device


def zero3_layout(p: nn.Parameter) -> Zero3Layout:
    ds_tensor = attribute(p, "ds_tensor", "ZeRO-3 parameter")
    return Zero3Layout(int(attribute(ds_tensor, "ds_numel", "ZeRO-3 parameter.ds_tensor")),
                       int(attribute(p, "ds_numel", "ZeRO-3 parameter")),
                       attribute(p, "ds_shape", "ZeRO-3 parameter"), ds_tensor.device)


def full_numel(p: nn.Parameter, stage: int) -> int:
    """Elements of the full parameter (ZeRO-3 parameters are empty placeholders between steps)."""
    return zero3_layout(p).numel if stage == 3 else p.numel()


def local_fp32_param(p: nn.Parameter) -> Tensor:
    """ZeRO-3: this rank's partition of the fp32 master of `p`."""
    return symbol("deepspeed.utils", "safe_get_local_fp32_param")(p)


def set_full_fp32_param(p: nn.Parameter, value: Tensor) -> None:
    """ZeRO-1/2: write the full fp32 value into this rank's fragment of the master."""
    symbol("deepspeed.utils", "safe_set_full_fp32_param")(p, value)


def fp32_partition(optimizer, p: nn.Parameter, key: str | None = None) -> Tensor:
    """ZeRO-3: this rank's flat partition of the fp32 master of `p` (key None) or of its optimizer
    state `key` (exp_avg, exp_avg_sq); a view, also when offloaded."""
    get = attribute(optimizer, "_get_fp32_opt_state_partition")
    piece, _ = get(p, release_swap_buffers=True, optim_state_key=key)
    return piece


def _fragment_mapping(p: nn.Parameter):
    """ZeRO-1/2: the parameter's link to this rank's fp32 fragment; None where this rank owns no part."""
    return attribute(p, "_hp_mapping", "ZeRO-1/2 parameter")


def fragment(p: nn.Parameter) -> Tensor | None:
    """ZeRO-1/2: the fp32 master fragment this rank's optimizer owns, None if it owns none of `p`."""
    mapping = _fragment_mapping(p)
    return None if mapping is None else attribute(mapping, "hp_fragment")


def fragment_span(p: nn.Parameter) -> tuple[int, int] | None:
    """ZeRO-1/2: (start, numel) of this rank's fragment in the flattened parameter, None if none."""
    mapping = _fragment_mapping(p)
    if mapping is None:
        return None
    addr = attribute(mapping, "lp_fragment_address")
    return int(addr.start), int(addr.numel)


# ------------------------------------------------------------------ gradient norm and steps
def _norm_method(stage: int) -> str:
    """The ZeRO optimizer method engine.step() calls for the global norm."""
    return "_get_norm_groups" if stage == 3 else "scaled_global_norm"


def grad_norm_parts(optimizer, stage: int) -> Any:
    """What engine.step() computes for the global norm: ZeRO-3 the norm of each group, ZeRO-1/2 the
    (loss-scaled) global norm. Hand it to `step_takes_grad_norm` so step() does not compute it again."""
    return attribute(optimizer, _norm_method(stage))()


def grad_norm_value(parts: Any, optimizer, stage: int) -> float:
    """The global gradient norm of `parts` divided by the loss scale; inf when it is not finite."""
    is_invalid = symbol("deepspeed.runtime.utils", "is_invalid_grad_norm")
    norm = symbol("deepspeed.runtime.utils", "combine_grad_norm_groups")(parts) if stage == 3 else parts
    if is_invalid(norm):
        return math.inf
    return float(norm) / float(getattr(optimizer, "loss_scale", 1.0) or 1.0)


def global_grad_norm(optimizer, stage: int) -> float:
    """The global gradient norm the engine's next step() computes, divided by the loss scale;
    inf when it is not finite."""
    return grad_norm_value(grad_norm_parts(optimizer, stage), optimizer, stage)


def set_clip(optimizer, max_norm: float) -> None:
    """The norm the engine clips to inside step() (0 = off)."""
    attribute(optimizer, "clip_grad")  # a renamed attribute would silently stop clipping
    optimizer.clip_grad = float(max_norm)


@contextlib.contextmanager
def step_takes_grad_norm(optimizer, stage: int, parts: Any) -> Iterator[None]:
    """Inside, engine.step() takes `parts` (grad_norm_parts, computed once before the step) as its
    global norm instead of computing it again; on this optimizer object, for this block."""
    method = (lambda: parts) if stage == 3 else (lambda *a, **k: parts)
    with _overridden(optimizer, _norm_method(stage), method):
        yield


def invalid_grad_norm(optimizer, stage: int) -> contextlib.AbstractContextManager:
    """Inside, the ZeRO optimizer sees a NaN global norm, so engine.step() takes its overflow path
    (no update, partitioned gradients dropped, fp16 loss scale backed off)."""
    nan = torch.tensor(float("nan"))
    return step_takes_grad_norm(optimizer, stage, [nan] if stage == 3 else nan)


def skipped_steps(engine) -> int:
    """The engine's count of optimizer steps it skipped (overflow)."""
    return int(attribute(engine, "skipped_steps", "DeepSpeedEngine"))


def check_step_skipped(engine, skipped_before: int) -> None:
    """After a step the trainer had DeepSpeed skip: raise NonFiniteStepApplied unless DeepSpeed says it
    did not apply it and counted it skipped (`skipped_before`: skipped_steps(engine) before the step).
    The skip goes through DeepSpeed's internals (invalid_grad_norm), which a new release may route
    around: a non-finite update must then stop the run, not be trained on silently."""
    applied = attribute(engine, "was_step_applied", "DeepSpeedEngine")()
    after = skipped_steps(engine)
    if applied or after != skipped_before + 1:
        raise NonFiniteStepApplied(
            f"DeepSpeed {installed_version()} applied an optimizer step that had to be skipped (non-finite loss "
            f"or gradient norm): was_step_applied()={applied}, skipped_steps {skipped_before} -> {after}. The "
            f"weights of this step are not to be trusted; the last checkpoint is. Tested with deepspeed{TESTED}: "
            f"adapt invalid_grad_norm in trainer/strategies/deepspeed_compat.py")


if __name__ == "__main__":
    sys.exit(_convert_in_this_process(sys.argv[1:]))
