"""slurm/submitit_compat.py: submitit's private sbatch renderer behind a checked seam. The real
renderer in this process (no SLURM needed); a renamed renderer or a dropped keyword is named. (That
the rendering equals what a real executor submits: tests/test_slurm_cluster.py.)"""

from __future__ import annotations

import sys

import pytest

from slurm import submitit_compat as compat
from slurm.launch import render_sbatch


def _render(tmp_path) -> str:
    return render_sbatch(str(tmp_path / "%j"), nodes="1-2", tasks_per_node=2, gpus_per_node=0, cpus_per_task=1,
                         partition="debug", time_min=7, job_name="x", extra_sbatch=["qos=normal"])


def test_the_dry_run_renders_the_sbatch_script_with_the_installed_submitit(tmp_path):
    assert compat.is_tested(compat.installed_version())
    script = _render(tmp_path)
    for line in ("#SBATCH --job-name=x", "#SBATCH --partition=debug", "#SBATCH --time=7", "#SBATCH --qos=normal",
                 "#SBATCH --requeue", "#SBATCH --nodes=1-2", "#SBATCH --ntasks-per-node=2", "--wait=120"):
        assert line in script, line


def test_a_renamed_renderer_is_named_with_the_versions(tmp_path, monkeypatch):
    import submitit.slurm.slurm as slurm_module

    monkeypatch.delattr(slurm_module, "_make_sbatch_string")
    with pytest.raises(compat.SubmititInternalMissing) as e:
        _render(tmp_path)
    message = str(e.value)
    assert "has no submitit.slurm.slurm._make_sbatch_string" in message
    assert compat.installed_version() in message and compat.TESTED in message


def test_a_keyword_the_renderer_no_longer_takes_is_named(tmp_path, monkeypatch):
    import submitit.slurm.slurm as slurm_module

    real = slurm_module._make_sbatch_string

    def without_srun_args(command, folder, job_name="submitit", partition=None, time=5, nodes=1,
                          ntasks_per_node=None, cpus_per_task=None, gpus_per_node=None, signal_delay_s=90,
                          additional_parameters=None):
        return real(command=command, folder=folder)

    monkeypatch.setattr(slurm_module, "_make_sbatch_string", without_srun_args)
    with pytest.raises(compat.SubmititInternalMissing, match=r"keyword\(s\) srun_args of submitit"):
        _render(tmp_path)


def test_an_untested_version_warns_once(monkeypatch):
    monkeypatch.setattr(compat._RANGE, "checked", None)
    monkeypatch.setattr(sys.modules["submitit"], "__version__", "2.0.0")
    with pytest.warns(compat.SubmititVersionWarning, match="submitit 2.0.0 is installed"):
        compat.check_version()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_version()
