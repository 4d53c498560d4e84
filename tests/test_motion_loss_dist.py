"""The motion head's auxiliary loss under every strategy: its gradient at the first step, with the
shards' stored motion and no caption dropout (so it depends only on the global batch), equals a single
process's at the same global batch, whatever the split over ranks and micro-batches. A bug that skips
the division by grad_accum, the averaging over ranks or the aux loss itself under one strategy makes
that strategy's gradient differ by a factor (or vanish).

Real runs of `python -m trainer.train` on the session's real tiny shards (tests/trainer_helpers.py), 2
gloo ranks for DDP, FSDP2 and ZeRO-3, with the testing.grad_probe callback writing the full gradient."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import run_train, step_log, tiny_config

from testing.fault_injection import SPEC as FAULTS
from testing.grad_probe import SPEC as GRAD_PROBE

GLOBAL_BATCH = 4
# name: (strategy section, data.batch_size, optim.grad_accum, processes); batch x accum x processes = 4
RUNS = {
    "single": ({"strategy": "single"}, 4, 1, 1),
    "single-accum2": ({"strategy": "single"}, 2, 2, 1),
    "ddp": ({"strategy": "ddp"}, 2, 1, 2),
    "fsdp-accum2": ({"strategy": "fsdp"}, 1, 2, 2),
    "zero3": ({"strategy": "deepspeed", "zero_stage": 3}, 2, 1, 2),
}


@pytest.fixture(scope="module")
def head_grads(trainer_shards, tmp_path_factory) -> dict[str, tuple[dict, str]]:
    """{run: ({param name: full gradient}, the first step's batch digest)}."""
    shards, _ = trainer_shards
    root = tmp_path_factory.mktemp("motion_grads")
    out = {}
    for name, (parallel, batch, accum, nproc) in RUNS.items():
        assert batch * accum * nproc == GLOBAL_BATCH
        run_dir, probe = root / name, root / f"{name}.pt"
        cfg = tiny_config(root / f"{name}.yaml", shards, run_dir, model={"motion_conditioning": True},
                          parallel=parallel, data={"batch_size": batch}, optim={"grad_accum": accum},
                          run={"steps": 1, "ckpt_every": 0, "caption_dropout": 0.0, "callbacks": [FAULTS, GRAD_PROBE]})
        r = run_train(cfg, nproc=nproc, timeout=300, VDM_TEST_GRAD_PROBE=str(probe),
                      VDM_TEST_GRAD_PROBE_PREFIX="motion_cond.head")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        out[name] = (torch.load(probe, weights_only=True), step_log(run_dir)[0]["batch_digest"])
    return out


@pytest.mark.parametrize("name", [n for n in RUNS if n != "single"])
def test_motion_head_gradient_equals_the_single_process_reference(head_grads, name):
    ref, ref_digest = head_grads["single"]
    grads, digest = head_grads[name]
    assert digest == ref_digest  # the same global batch
    assert sorted(grads) == sorted(ref) and len(ref) == 4  # two Linear layers: weights and biases
    assert all(g.abs().max() > 0 for g in ref.values())
    for key in ref:
        torch.testing.assert_close(grads[key], ref[key], rtol=1e-4, atol=1e-7, msg=f"{name}: {key}")
