"""Which loader builds batches: the one a caller injected (tests), else the shard loader.

Its own small module because both the training loop and the evaluator need it, and neither should
import the other for it."""

from __future__ import annotations


def loader_factory_or_default(factory=None):
    """`factory(data_cfg, rank=, world_size=, train=)` (train loaders also get `grad_accum=`: part of the
    global batch that orders the samples), or data_pipeline.loader.build_loader when None
    (tests inject their own). Imported on first use: CLIs that never read shards skip its imports."""
    if factory is None:
        from data_pipeline.loader import build_loader as factory
    return factory
