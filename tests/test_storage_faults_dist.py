"""Storage faults of ddp, fsdp and deepspeed on 2 ranks, one torchrun launch per strategy
(tests/storage_fault_driver.py): a same-size-corrupted latest checkpoint falls back to the previous one
and ends with EMA weights bitwise equal to the uninterrupted run's; a tmpfs out_dir that fills during a
save stops every rank with the same message, sync and async, the latter through the CLI with exit 74.
The fault kinds themselves (truncated, missing, strict refusal, load failure) are
tests/test_storage_faults.py's, in process on the single strategy."""

from __future__ import annotations

import json

import pytest
from test_storage_faults import tmpfs
from trainer_helpers import assert_same_ema, run_in_group, torchrun_cmd

from common.exit_codes import EXIT_DISK_FULL

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
DRIVER = "tests/storage_fault_driver.py"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_storage_faults_on_two_ranks(strategy, trainer_shards, tmp_path):
    report_path = tmp_path / "report.json"
    with tmpfs(tmp_path / "small", "64m") as small:
        r = run_in_group(torchrun_cmd(DRIVER, 2, "--strategy", strategy, "--shards", trainer_shards[0],
                                      "--work", str(tmp_path), "--small", str(small), "--report", str(report_path)),
                         timeout=420)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    report = json.loads(report_path.read_text())
    assert [x["exit"] for x in report["ref"]] == [0, 0]

    # the damaged latest checkpoint: every rank fell back to step 2 and rewrote step 4 bitwise
    assert [x.get("exit") for x in report["fallback"]] == [0, 0], report["fallback"]
    assert f"checkpoint {tmp_path}/fallback/checkpoints/step-000004 is damaged ({report['damaged_file']}: crc32" in r.stdout
    assert "resuming from step-000002 instead" in r.stdout
    assert_same_ema(tmp_path / "ref", tmp_path / "fallback", 4, world_size=2)

    # full disk, sync: DiskFull on both ranks, step 2 intact and latest, no half checkpoint left
    for result in report["full_sync"]:
        assert result.get("raised") == "DiskFull" and result["exit_code"] == EXIT_DISK_FULL, result
        assert result["latest"] == "step-000002" and result["temp_dirs"] == []
    message = report["full_sync"][0]["message"]
    assert f"checkpoint step-000004 could not be written: no space in {small}/full_sync/checkpoints (filesystem " \
           f"tmpfs (tmpfs) mounted on {small}" in message
    assert "The previous checkpoint step-000002 is intact and `latest` names it" in message

    # full disk, async, through the CLI: exit 74 on both ranks, the same message on stderr
    ranks = [report["full_async"][0], json.loads((tmp_path / "report.json.rank1").read_text())]
    for result in ranks:
        assert result["exit"] == EXIT_DISK_FULL and result["latest"] == "step-000002", result
    assert ranks[0]["temp_dirs"] == []  # rank 0 removed it before leaving (rank 1 may look earlier)
    assert f"error: checkpoint step-000004 could not be written: no space in {small}/full_async" in r.stderr
