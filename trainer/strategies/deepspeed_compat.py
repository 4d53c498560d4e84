"""Every DeepSpeed internal the trainer relies on, in one version-checked place.

trainer/strategies/deepspeed.py uses DeepSpeed's public API (`deepspeed.initialize`,
`init_distributed`, `get_accelerator`, the engine's forward/backward/step/save_checkpoint/
load_checkpoint) and this module. Everything beyond that lives here: ZeRO optimizer methods and
attributes, ZeRO parameter attributes, the universal-checkpoint converter, the classes DeepSpeed
pickles into its checkpoint files, and our few monkeypatches (weights_only loading, background
checkpoint writes, the skipped shared-memory op build, a forced overflow step). So a DeepSpeed
upgrade breaks here, and says so:
- an installed version outside `TESTED` warns once per process (`DeepSpeedVersionWarning`), naming the
  installed and the tested versions;
- an internal that moved or vanished raises `DeepSpeedInternalMissing` (a RuntimeError) naming the
  symbol, the installed version and `TESTED`, where it is first needed, instead of an AttributeError
  or ImportError in the middle of a step.

On an upgrade: run the DeepSpeed tests (docs/strategies.md, "DeepSpeed upgrades"), adapt what they
name here, then move `TESTED`. Nothing here imports DeepSpeed at module import (it is slow, and
setup() must set DS_ACCELERATOR first); the version is checked on first use.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import math
import pickle
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version
from torch import Tensor, nn

log = logging.getLogger(__name__)

TESTED = ">=0.19,<0.20"  # the DeepSpeed releases this module was checked against (CPU/gloo tests)
_checked: str | None = None  # the version check_version() last looked at (it warns once per version)


class DeepSpeedVersionWarning(UserWarning):
    """The installed DeepSpeed is outside TESTED."""


class DeepSpeedInternalMissing(RuntimeError):
    """A DeepSpeed internal this module uses is not there in the installed version."""


# ------------------------------------------------------------------ version and lookup
def installed_version() -> str:
    import deepspeed

    return str(deepspeed.__version__)


def is_tested(version: str) -> bool:
    """Whether `version` lies in TESTED (local builds and pre-releases of a tested release count)."""
    try:
        return SpecifierSet(TESTED).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def check_version() -> str:
    """The installed DeepSpeed version; warns (once per version) when it is outside TESTED."""
    global _checked
    version = installed_version()
    if version != _checked:
        _checked = version
        if not is_tested(version):
            warnings.warn(f"DeepSpeed {version} is installed, but this trainer is tested with deepspeed{TESTED}: "
                          f"the DeepSpeed internals it uses (trainer/strategies/deepspeed_compat.py) may have "
                          f"changed. Install a tested version (pip install 'deepspeed{TESTED}') or see "
                          f"docs/strategies.md, 'DeepSpeed upgrades'", DeepSpeedVersionWarning, stacklevel=2)
    return version


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


# ------------------------------------------------------------------ checkpoint files
def checkpoint_record_classes() -> list[type]:
    """The plain DeepSpeed records its checkpoint files pickle: the ZeRO stage enum, the loss
    scalers and ZeRO-1/2 fragment addresses. The only classes a weights_only load allows."""
    return [symbol("deepspeed.runtime.zero.config", "ZeroStageEnum"),
            symbol("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
            symbol("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
            symbol("deepspeed.utils.tensor_fragment", "fragment_address")]


def _load_records(load, allowed: list[type], *args, **kwargs) -> Any:
    """load(*args, **kwargs) allowing `allowed`; a DeepSpeed class that is not allowed is named (a new
    DeepSpeed may pickle a record we do not know; a tampered file may name anything)."""
    try:
        with torch.serialization.safe_globals(allowed):
            return load(*args, **kwargs)
    except pickle.UnpicklingError as e:
        if "deepspeed" not in str(e):
            raise
        raise pickle.UnpicklingError(
            f"{e}\n\nA DeepSpeed checkpoint file holds a class outside checkpoint_record_classes() in "
            f"trainer/strategies/deepspeed_compat.py (DeepSpeed {installed_version()}, tested with "
            f"deepspeed{TESTED}). If it is a plain record of a newer DeepSpeed, add it there.") from e


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """DeepSpeed's checkpoint code calls torch.load(weights_only=False) itself (the universal
    conversion and loading); inside this context every torch.load is weights_only=True with only
    checkpoint_record_classes() allowed, so a tampered checkpoint cannot run code."""
    original = torch.load
    allowed = checkpoint_record_classes()

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return _load_records(original, allowed, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def load_checkpoints_weights_only(engine) -> None:
    """Make the engine read its checkpoint files with torch.load(weights_only=True), allowing only
    checkpoint_record_classes(); DeepSpeed itself unpickles them with weights_only=False."""
    allowed = checkpoint_record_classes()
    ckpt_engine = attribute(engine, "checkpoint_engine", "DeepSpeedEngine")
    attribute(ckpt_engine, "load")

    def load(path: str, map_location=None):
        return _load_records(torch.load, allowed, path, map_location=map_location, weights_only=True)

    ckpt_engine.load = load


@contextlib.contextmanager
def checkpoint_writes_through(engine, save) -> Iterator[None]:
    """For the duration: the engine's checkpoint engine hands each file to `save(obj, path)` instead
    of calling torch.save (`checkpoint_engine.save(state_dict, path)` is DeepSpeed's pluggable write,
    the one its Nebula and NVMe engines replace; run.async_save hands it to a writer thread)."""
    ckpt_engine = attribute(engine, "checkpoint_engine", "DeepSpeedEngine")
    original = attribute(ckpt_engine, "save")
    ckpt_engine.save = lambda state_dict, path: save(state_dict, path)
    try:
        yield
    finally:
        ckpt_engine.save = original


def ds_to_universal(src: str, dst: str) -> None:
    """deepspeed.checkpoint.ds_to_universal (its CLI's main) in this process, without worker pools,
    reading the files weights_only."""
    main = symbol("deepspeed.checkpoint.ds_to_universal", "main")
    args = argparse.Namespace(input_folder=src, output_folder=dst, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    with weights_only_torch_load():
        main(args)


@contextlib.contextmanager
def universal_checkpoint_loading(engine, enabled: bool) -> Iterator[None]:
    """engine.load_checkpoint inside reads a universal checkpoint when `enabled` (the engine config's
    flag, read by load_checkpoint and the ZeRO optimizer; switched off again afterwards)."""
    config = attribute(engine, "_config", "DeepSpeedEngine")
    attribute(config, "load_universal_checkpoint")
    config.load_universal_checkpoint = enabled
    try:
        yield
    finally:
        config.load_universal_checkpoint = False


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


def optimizer_state_piece(optimizer, p: nn.Parameter, key: str, stage: int) -> Tensor:
    """This rank's piece of the optimizer state `key` of `p`, laid out like its fp32 master piece
    (fp32_partition / fragment): what tests/resume_dump.py gathers."""
    if stage == 3:
        return fp32_partition(optimizer, p, key)
    mapping = _fragment_mapping(p)
    if mapping is None:
        return torch.empty(0)
    flat = attribute(optimizer, "single_partition_of_fp32_groups")[attribute(mapping, "param_group_index")]
    addr = attribute(mapping, "hp_fragment_address")
    return attribute(optimizer, "optimizer").state[flat][key].narrow(0, addr.start, addr.numel)


# ------------------------------------------------------------------ gradient norm and steps
def global_grad_norm(optimizer, stage: int) -> float:
    """The global gradient norm the engine's next step() computes, divided by the loss scale;
    inf when it is not finite."""
    is_invalid = symbol("deepspeed.runtime.utils", "is_invalid_grad_norm")
    if stage == 3:
        combine = symbol("deepspeed.runtime.utils", "combine_grad_norm_groups")
        norm = combine(attribute(optimizer, "_get_norm_groups")())
    else:
        norm = attribute(optimizer, "scaled_global_norm")()
    if is_invalid(norm):
        return math.inf
    return float(norm) / float(getattr(optimizer, "loss_scale", 1.0) or 1.0)


def set_clip(optimizer, max_norm: float) -> None:
    """The norm the engine clips to inside step() (0 = off)."""
    attribute(optimizer, "clip_grad")  # a renamed attribute would silently stop clipping
    optimizer.clip_grad = float(max_norm)


@contextlib.contextmanager
def invalid_grad_norm(optimizer, stage: int) -> Iterator[None]:
    """Inside, the ZeRO optimizer computes a NaN global norm, so engine.step() takes its overflow path
    (no update, partitioned gradients dropped, fp16 loss scale backed off)."""
    name = "_get_norm_groups" if stage == 3 else "scaled_global_norm"  # what step() calls for the norm
    attribute(optimizer, name)  # patching a method DeepSpeed no longer calls would let the step apply
    nan = torch.tensor(float("nan"))
    setattr(optimizer, name, (lambda: [nan]) if stage == 3 else (lambda *a, **k: nan))
    try:
        yield
    finally:
        delattr(optimizer, name)
