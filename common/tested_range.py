"""A dependency checked against the release range a compatibility module was tested with.

trainer/strategies/deepspeed_compat.py and slurm/submitit_compat.py each use another package's
internals; each says which releases it was checked against (`TESTED`, a PEP 440 specifier) and warns,
once per installed version, when another one is installed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version


def in_range(version: str, tested: str) -> bool:
    """Whether `version` lies in `tested` (local builds and pre-releases of a tested release count)."""
    try:
        return SpecifierSet(tested).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


class TestedRange:
    """`check(version)` warns with `warning(message(version))` when `version` is outside `tested`, once
    per version (`checked`: the version last looked at; reset it to check again)."""

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, tested: str, warning: type[Warning], message: Callable[[str], str]):
        self.tested, self.warning, self.message = tested, warning, message
        self.checked: str | None = None

    def check(self, version: str) -> str:
        if version != self.checked:
            self.checked = version
            if not in_range(version, self.tested):
                warnings.warn(self.message(version), self.warning, stacklevel=3)
        return version
