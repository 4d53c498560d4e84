"""Opt-in regional compilation (`run.compile: true`): torch.compile on each block's forward.

Why regional and not the whole model: the U-Net's forward is a Python loop over ~40 blocks with skip
connections; compiling it whole makes one huge graph (minutes of compilation, recompiled whenever
anything about the loop changes). Compiling each block's `forward` instead, as torchtitan compiles
each transformer block, keeps graphs small and lets blocks of the same type and shape share one
compiled graph: Dynamo treats the parameters as graph inputs (inlined nn modules), so two ResBlocks
with the same channels and resolution hit the same cache entry. What remains is one graph per
distinct (block type, shapes) pair, all compiled in the first step.

No recompilation over a run: shapes are static by construction (per-rank batch, video and image
frame counts and resolution are fixed per run; `dynamic=False`), and the per-code-object recompile
limit is raised to the number of blocks so that the distinct shapes of one block type never exhaust it
(at the default of 8, later shapes would silently run uncompiled). A caption length that changes
between batches only reaches the cross-attention's key/value length; those blocks recompile once per
new length; `Compiled.new_graphs()` makes that visible in the log.

Only `forward` is compiled, never `__call__`: module hooks (FSDP2's all-gather, DDP's) stay outside the
graph, and the state dict keeps its keys. Applied to the bare model before a strategy wraps it (the
order torchtitan uses: checkpointing, compile, then sharding). The model module knows nothing of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn


def compiled_graph_count() -> int:
    """Graphs Dynamo has compiled in this process (all code objects)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class Compiled:
    """What `compile_blocks` did, and the graph count to compare later steps against."""

    blocks: int
    backend: str
    graphs_at_start: int = 0
    graphs_after_warmup: int | None = None
    warmup_s: float = 0.0
    _t0: float = field(default_factory=time.perf_counter)

    def graphs(self) -> int:
        return compiled_graph_count() - self.graphs_at_start

    def mark_warm(self, first_step_s: float) -> None:
        """Call after the first training step (where every block compiles)."""
        self.graphs_after_warmup = self.graphs()
        self.warmup_s = first_step_s

    def new_graphs(self) -> int:
        """Graphs compiled since the first step: recompilations (0 in a healthy run)."""
        return 0 if self.graphs_after_warmup is None else self.graphs() - self.graphs_after_warmup


def compile_blocks(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> Compiled:
    """torch.compile every block of `model.blocks()` in place (its `forward`), static shapes."""
    blocks = model.blocks()
    cfg = torch._dynamo.config
    limit = max(cfg.recompile_limit, len(blocks) + 8)
    cfg.recompile_limit = limit
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * limit)
    kwargs = {"mode": mode} if mode else {}
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend, dynamic=False, **kwargs)
    return Compiled(blocks=len(blocks), backend=backend, graphs_at_start=compiled_graph_count())
