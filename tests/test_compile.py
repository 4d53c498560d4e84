"""Regional compilation (`run.compile`, trainer/compile.py): graphs are compiled in the first step only
(counted: no recompilation over later steps, also with checkpointing on), blocks of one type and shape
share a graph, and losses and gradients equal eager mode.

The `aot_eager` backend runs Dynamo and AOTAutograd (the graph capture and the forward/backward
split, where recompilation is decided) but generates no kernels, so no C++ compiler is needed and a
tiny model compiles in seconds; inductor's code generation is the GPU check's business
(bench/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch
from test_trainer_inprocess import _cfg, _trainer
from test_unet import inputs, make_model

from trainer.compile import compile_blocks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("policy", ["none", "all", "selective"])
def test_blocks_compile_once_share_graphs_and_match_eager(policy):
    eager = make_model(checkpoint_policy=policy).train()
    model = make_model(checkpoint_policy=policy).train()
    compiled = compile_blocks(model, backend="aot_eager")
    z, logsnr, text, mask = inputs(f=5)
    counts = []
    for step in range(3):
        out = model(z, logsnr, text, mask, num_video_frames=3)
        out.square().mean().backward()
        if step == 0:
            compiled.mark_warm(0.0)
        counts.append(compiled.graphs())
    assert compiled.new_graphs() == 0 and counts[0] == counts[-1] > 0, counts
    # one graph per distinct (block type, shapes): same-shape blocks share one
    assert counts[0] < len(model.blocks()), (counts, len(model.blocks()))

    ref = eager(z, logsnr, text, mask, num_video_frames=3)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        # three accumulated backward passes against one
        torch.testing.assert_close(p.grad, 3 * q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert set(model.state_dict()) == set(eager.state_dict())  # forward compiled, keys untouched


def test_a_changed_shape_is_seen_as_recompilation():
    model = make_model().train()
    compiled = compile_blocks(model, backend="aot_eager")
    z, logsnr, text, mask = inputs(f=4, L=5)
    model(z, logsnr, text, mask).sum().backward()
    compiled.mark_warm(0.0)
    z, logsnr, text, mask = inputs(f=4, L=6)  # another caption length: the cross-attention recompiles
    model(z, logsnr, text, mask).sum().backward()
    assert compiled.new_graphs() > 0


def test_trainer_compiles_in_the_first_step_and_never_again(tmp_path, capsys):
    """A real run with run.compile: losses equal an eager run's (within float tolerance), the log
    reports the compilation, and perf/recompiles stays 0."""
    losses = {}
    for name, compile_on in (("eager", False), ("compiled", True)):
        torch._dynamo.reset()
        cfg = _cfg(tmp_path / name, run={"steps": 3, "log_every": 1, "ckpt_every": 0, "compile": compile_on,
                                         "compile_backend": "aot_eager"})
        trainer = _trainer(cfg)
        try:
            trainer.train()
        finally:
            trainer.close()
        losses[name] = [float(ln.split("loss ")[1].split(" ")[0]) for ln in capsys.readouterr().out.splitlines()
                        if ln.startswith("step ")]
        if compile_on:
            assert trainer.compiled.graphs_after_warmup > 0 and trainer.compiled.new_graphs() == 0
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4), losses


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_compile_under_two_process_strategies_matches_eager(tmp_path, trainer_shards, strategy):
    """run.compile under DDP, FSDP2 and DeepSpeed ZeRO-2 (2 gloo processes, the real CLI): the same
    losses as the eager run within float tolerance, compiled in the first step, no recompilation."""
    from trainer_helpers import run_train, step_log, tiny_config

    shards, _ = trainer_shards
    losses = {}
    for name, compile_on in (("eager", False), ("compiled", True)):
        out = tmp_path / name
        cfg = tiny_config(tmp_path / f"{name}.yaml", shards, out, parallel={"strategy": strategy},
                          run={"steps": 3, "ckpt_every": 0, "compile": compile_on, "compile_backend": "aot_eager"})
        r = run_train(cfg, nproc=2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        losses[name] = [rec["loss"] for _, rec in sorted(step_log(out).items())]
        if compile_on:
            assert "[compile] first step" in r.stdout and "recompilation" not in r.stdout
    assert len(losses["eager"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4), losses
