"""The conftest hook that turns skips into failures under CI=true (and only there)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = "VDM_TEST_SKIP_PROBE"  # set only by the test below: the probes pass in a normal run


def test_probe_skips_in_the_body():
    if os.environ.get(PROBE) == "1":
        pytest.skip("probe: body skip")


@pytest.mark.skipif(os.environ.get(PROBE) == "1", reason="probe: skipif marker")
def test_probe_skips_by_marker():
    pass


@pytest.fixture
def _skipping_fixture():
    if os.environ.get(PROBE) == "1":
        pytest.skip("probe: fixture skip")


def test_probe_skips_in_a_fixture(_skipping_fixture):
    pass


def test_probe_xfail():
    if os.environ.get(PROBE) == "1":
        pytest.xfail("probe: expected failure")


@pytest.mark.parametrize("ci", ["true", "", "false"])
def test_skips_fail_under_ci_true_only(ci):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **{PROBE: "1", "CI": ci})
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-p", "no:randomly",
           f"{__file__}::test_probe_skips_in_the_body", f"{__file__}::test_probe_skips_by_marker",
           f"{__file__}::test_probe_skips_in_a_fixture", f"{__file__}::test_probe_xfail"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    if ci == "true":
        assert r.returncode == 1, out
        assert "1 failed, 1 xfailed, 2 errors" in out, out  # a failure in setup counts as an error
        for reason in ("body skip", "skipif marker", "fixture skip"):
            assert f"CI=true, so this skip is a failure: probe: {reason}" in out, out
    else:
        assert r.returncode == 0, out
        assert "3 skipped, 1 xfailed" in out, out
