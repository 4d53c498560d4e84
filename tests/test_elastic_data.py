"""Elastic determinism of the data through the real training CLI: the per-step `batch_digest` in
train_log.jsonl (sorted keys of the step's global batch, image-frame sources included) is the same for
1 process and 2 DDP processes over gloo, and for 0 and 2 loader workers, at the same global batch."""

from __future__ import annotations

import hashlib

from process_group import MULTI_PROCESS_TIMEOUT_S
from trainer_helpers import run_train, saved_tensors, step_log, tiny_config

from trainer.loop import batch_digest, batch_keys


def test_batch_digest_is_the_sorted_keys_of_clips_and_image_sources():
    batch = {"keys": ["b", "a"], "image_keys": [["c"], ["a"]]}
    assert batch_keys(batch) == ["b", "a", "c", "a"]
    assert batch_digest(batch_keys(batch)) == hashlib.sha256(b"a\na\nb\nc").hexdigest()
    assert batch_digest(["a", "b"]) == batch_digest(["b", "a"]) != batch_digest(["a", "c"])
    assert batch_keys({"video": None}) == []  # a loader without keys (in-memory test loaders)


def _digests(out_dir) -> list[str]:
    log = step_log(out_dir)
    assert sorted(log) == list(range(len(log)))
    return [log[s]["batch_digest"] for s in sorted(log)]


def test_one_and_two_ranks_and_zero_and_two_workers_consume_the_same_samples(tmp_path, trainer_shards):
    """Global batch 2 as 1 process x 2 (0 and 2 workers), 2 DDP processes x 1 and 1 process x 1 x
    grad_accum 2: 6 steps over 12 clips
    in 3 shards (so the streams cross epoch boundaries), one joint image frame per clip."""
    shards, _ = trainer_shards
    common = dict(run={"steps": 6, "ckpt_every": 6})
    runs = {
        "single-w0": (dict(data={"batch_size": 2, "num_workers": 0}), 1),
        "single-w2": (dict(data={"batch_size": 2, "num_workers": 2}), 1),
        "ddp2-w0": (dict(data={"batch_size": 1, "num_workers": 0}, parallel={"strategy": "ddp"}), 2),
        "single-accum2": (dict(data={"batch_size": 1, "num_workers": 0},
                               optim={"lr": 1e-3, "warmup_steps": 2, "grad_accum": 2}), 1),
    }
    digests = {}
    for name, (kw, nproc) in runs.items():
        out = tmp_path / name
        sections = {**common, **kw}
        r = run_train(tiny_config(tmp_path / f"{name}.yaml", shards, out, **sections), nproc=nproc)
        assert r.returncode == 0, r.stdout + r.stderr
        digests[name] = _digests(out)
    ref = digests["single-w0"]
    assert len(ref) == 6 and len(set(ref)) == 6  # every step its own batch
    assert all(len(d) == 64 and int(d, 16) >= 0 for d in ref)
    assert digests["single-w2"] == ref
    assert digests["ddp2-w0"] == ref
    assert digests["single-accum2"] == ref


def test_ddp_two_ranks_killed_resume_on_one_rank_with_the_same_samples_and_state(tmp_path, trainer_shards):
    """Issue 10 item 2 for the replicated strategies: 2 DDP ranks (batch 1 each) are SIGKILLed after the
    mid-run checkpoint (step 2 of 4); a single process (batch 2: the same global batch) resumes it with no
    flag, finishes with exit 0, and logs the uninterrupted 2-rank run's batch_digest for every step. The
    state it resumed from is the saved one bitwise: model, AdamW moments and EMA (checked by loading the
    checkpoint into the real Trainer in this process)."""
    import torch

    from common.config import load_config
    from trainer.checkpoint import find_latest, read_state
    from trainer.config import TrainConfig
    from trainer.distributed import DistEnv
    from trainer.loop import Trainer

    shards, _ = trainer_shards
    two = dict(parallel={"strategy": "ddp"}, data={"batch_size": 1}, run={"steps": 4, "ckpt_every": 2})
    one = dict(parallel={"strategy": "single"}, data={"batch_size": 2}, run={"steps": 4, "ckpt_every": 2})
    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    r = run_train(tiny_config(tmp_path / "a.yaml", shards, straight, **two), nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_train(tiny_config(tmp_path / "b.yaml", shards, elastic, **two), nproc=2,
                  VDM_TEST_KILL_AT_STEP="3")
    assert r.returncode != 0
    ckpt = find_latest(elastic)
    assert ckpt.name == "step-000002" and read_state(ckpt)["world_size"] == 2

    # the saved state, loaded by the real Trainer as a single process: bitwise what rank 0 wrote
    cfg1 = tiny_config(tmp_path / "c.yaml", shards, elastic, **one)
    trainer = Trainer(load_config(TrainConfig, cfg1), DistEnv(0, 1, 0, torch.device("cpu"), None))
    assert trainer.step == 2
    module = trainer.strategy.module
    model = saved_tensors(ckpt, "model")
    assert sorted(model) == sorted(module.state_dict())
    assert all(torch.equal(v, model[k]) for k, v in module.state_dict().items())
    optim = saved_tensors(ckpt, "optim.state")  # "<param name>.exp_avg", ...
    live = {f"{n}.{k}": v for n, p in module.named_parameters()
            for k, v in trainer.strategy.optimizer.state.get(p, {}).items()}
    assert sorted(live) == sorted(optim) and len(optim) > 0
    assert all(torch.equal(live[k], optim[k]) for k in optim)
    saved = saved_tensors(ckpt, "ema")  # the replicas' EMA, written once
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert sorted(saved) == sorted(names)
    assert all(torch.equal(a, saved[n]) for a, n in zip(trainer.ema.shadow, names))
    trainer.close()
    del trainer

    r = run_train(cfg1, nproc=1, timeout=MULTI_PROCESS_TIMEOUT_S)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[resume]" in r.stdout and "step-000002" in r.stdout
    a, b = _digests(straight), _digests(elastic)
    assert len(a) == 4 and b == a


def test_single_process_killed_resume_on_two_ddp_ranks_with_the_same_samples(tmp_path, trainer_shards):
    """The other direction: 1 process (batch 2) SIGKILLed after its step-2 checkpoint, resumed by 2 DDP
    processes (batch 1 each) with no flag: exit 0, and every step's batch_digest equals the
    uninterrupted 1-process run's (rank 1, which the saved run did not have, reads streams that rank 0
    of the saved run read, from the saved loader state)."""
    shards, _ = trainer_shards
    one = dict(parallel={"strategy": "single"}, data={"batch_size": 2}, run={"steps": 4, "ckpt_every": 2})
    two = dict(parallel={"strategy": "ddp"}, data={"batch_size": 1}, run={"steps": 4, "ckpt_every": 2})
    straight, elastic = tmp_path / "straight", tmp_path / "elastic"
    r = run_train(tiny_config(tmp_path / "a.yaml", shards, straight, **one), timeout=MULTI_PROCESS_TIMEOUT_S)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_train(tiny_config(tmp_path / "b.yaml", shards, elastic, **one), timeout=MULTI_PROCESS_TIMEOUT_S, VDM_TEST_KILL_AT_STEP="3")
    assert r.returncode != 0
    r = run_train(tiny_config(tmp_path / "c.yaml", shards, elastic, **two), nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[resume]" in r.stdout and "step-000002" in r.stdout
    a, b = _digests(straight), _digests(elastic)
    assert len(a) == 4 and b == a
