"""Shared fixtures: a tiny local BERT and small real synthetic videos (made once per session)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _fail_skip_in_ci(report) -> None:
    """Under CI=true a skip is a failure that keeps its reason: CI must run everything it claims to
    (a SLURM cluster that did not come up, a missing package), and no call site has to remember it.
    Expected failures (xfail) stay as they are."""
    if not (in_ci() and report.skipped and not hasattr(report, "wasxfail")):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"CI=true, so this skip is a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a whole module skipped at import (pytest.importorskip at module level, ...)
    _fail_skip_in_ci(outcome.get_result())


# Modules that need the SLURM cluster: one unit of work in parallel runs (see below).
SLURM_MODULES = ("test_slurm_training.py", "test_slurm_cluster.py", "test_shard_slurm.py")
# Modules that take longest (measured with --durations=0, README "Two commands"), first in the queue:
# a long module started last would leave a core idle at the end. The SLURM unit goes first: it mostly waits.
SLOWEST_FIRST = (
    *SLURM_MODULES,
    "test_elastic_checkpoint.py", "test_plan_memory.py", "test_strategies_dist.py", "test_trainer_demo.py",
    "test_strategies_cli.py", "test_storage_faults_dist.py", "test_motion_loss_dist.py", "test_elastic_data.py",
    "test_compile.py", "test_trainer_export_sample.py", "test_trainer_single.py", "test_evaluate.py",
    "test_storage_faults.py", "test_shard_parallel.py", "test_perf.py", "test_trainer_ddp.py", "test_sampling.py",
)


def pytest_xdist_make_scheduler(config, log):
    """Parallel runs (pytest-xdist, `-n N --dist loadscope`): each module is one unit of work, so a
    module's expensive fixtures (reference runs, shard sets) are built once, and the SLURM modules are
    one unit, run one test at a time, since they share the cluster's two nodes, its partitions'
    GraceTime and drained-node state. Units are handed out in collection order (slowest first, see
    pytest_collection_modifyitems; run with --no-loadscope-reorder). A scheduler of our own because
    xdist's `loadgroup` marks do not reach the scheduler under pytest 9 (it renames a private field)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "slurm" if module.rsplit("/", 1)[-1] in SLURM_MODULES else module

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The slowest modules first (SLOWEST_FIRST); the order within a module is kept. A test marked
    `slurm` outside SLURM_MODULES would run beside the others on the cluster: refused."""
    stray = {item.path.name for item in items if item.get_closest_marker("slurm")} - set(SLURM_MODULES)
    if stray:
        raise pytest.UsageError(f"tests marked slurm outside SLURM_MODULES (tests/conftest.py): {sorted(stray)}")
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """Directory of a tiny random BERT (hidden 32) with a WordPiece vocab; loadable by TextEncoder."""
    from testing.tiny_bert import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), hidden_size=32)


@pytest.fixture(scope="session")
def trainer_shards(tmp_path_factory, tiny_bert_dir) -> tuple[str, str]:
    """(shards dir, encoder dir) for the trainer tests: see trainer_helpers.make_trainer_shards."""
    from trainer_helpers import make_trainer_shards

    return make_trainer_shards(tmp_path_factory, tiny_bert_dir)


@pytest.fixture(scope="session")
def synthetic_videos(tmp_path_factory) -> str:
    """Manifest (key,path,caption) of 12 real h264 mp4s, 16 frames of 32x32 at 8 fps."""
    from data_pipeline.synthetic import make_synthetic_videos

    return make_synthetic_videos(tmp_path_factory.mktemp("synthetic"), n=12, frames=16, size=32, fps=8, seed=0)


@pytest.fixture(scope="session")
def standin_i3d_file(tmp_path_factory):
    """A TorchScript file with the I3D FVD detector's call signature (tests/fvd_helpers.py)."""
    from fvd_helpers import save_standin_i3d

    return save_standin_i3d(tmp_path_factory.mktemp("detector") / "standin_i3d.pt")


@pytest.fixture
def one_thread():
    """Tensors in the sampler tests are tiny: intra-op threads only add spin-wait overhead (10x on a
    busy 2-core box). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
