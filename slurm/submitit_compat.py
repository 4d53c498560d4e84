"""submitit's private sbatch renderer behind a checked seam, as trainer/strategies/deepspeed_compat.py
does for DeepSpeed's internals.

`python -m slurm.launch --dry-run` prints the script submitit would submit, without SLURM. submitit
has no public function for that, so we call its private `submitit.slurm.slurm._make_sbatch_string`.
A submitit release that renames it, or drops or renames a keyword we pass, fails here with
`SubmititInternalMissing` naming the symbol or the keywords, the installed version and `TESTED`,
instead of an ImportError or a TypeError inside the renderer; a version outside `TESTED` warns once.
tests/test_slurm_cluster.py checks that the rendering equals what a real executor submits.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from common.tested_range import TestedRange, in_range

TESTED = ">=1.5,<1.6"  # the submitit releases the renderer's keywords were checked against
RENDERER = ("submitit.slurm.slurm", "_make_sbatch_string")


class SubmititVersionWarning(UserWarning):
    """The installed submitit is outside TESTED."""


_RANGE = TestedRange(TESTED, SubmititVersionWarning, lambda version: (
    f"submitit {version} is installed, but slurm.launch --dry-run is tested with submitit{TESTED} "
    f"(slurm/submitit_compat.py)"))


class SubmititInternalMissing(RuntimeError):
    """A submitit internal slurm.launch uses is not there (or takes other arguments) in this version."""


def installed_version() -> str:
    import submitit

    return str(submitit.__version__)


def is_tested(version: str) -> bool:
    return in_range(version, TESTED)


def check_version() -> str:
    """The installed submitit version; warns (once per version) when it is outside TESTED."""
    return _RANGE.check(installed_version())


def _missing(what: str, cause: BaseException | None = None) -> SubmititInternalMissing:
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return SubmititInternalMissing(
        f"submitit {installed_version()} has no {what}{detail}; slurm.launch --dry-run renders the sbatch "
        f"script with it and is tested with submitit{TESTED}. Install a tested version or adapt "
        f"slurm/submitit_compat.py")


def make_sbatch_string(**params: Any) -> str:
    """submitit's sbatch script for these keyword parameters (command, folder, job_name, nodes, ...)."""
    check_version()
    module, name = RENDERER
    try:
        render = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise _missing(f"{module}.{name}", e) from e
    accepted = inspect.signature(render).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise _missing(f"keyword(s) {', '.join(unknown)} of {module}.{name}")
    return render(**params)
