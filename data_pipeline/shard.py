"""Manifest → WebDataset tar shards with clips, captions and BERT token embeddings.

    python -m data_pipeline.shard --config configs/shard/demo.yaml [--set clip.frames=16] \
        [--manifest m.csv --out shards/ --workers 8] [--slurm --partition gpu --nodes 16 --time 240]

Shard N always holds manifest rows N*S .. (N+1)*S-1. Finished shards (tar + matching JSON) are
skipped, so rerunning the same command after a crash, a SIGKILL or a SLURM preemption finishes
the dataset with every readable video exactly once. Exit status: 0 done; 1 failure ratio above
--max-failure-ratio; 2 shards left unfinished (worker crash) — the summary says which.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

from common.config import ConfigError, load_config, to_dict
from common.logs import setup_logging
from data_pipeline.config import ShardConfig, config_hash, manifest_cache_dir
from data_pipeline.lifetime import die_with_parent, exit_when_process_exits
from data_pipeline.manifest import Manifest, ManifestError
from data_pipeline.stats import Summary, done_summary, merge_index
from data_pipeline.writer import remove_temp_files, write_json_atomic

log = logging.getLogger("data_pipeline.shard")
WORKER_PRELOAD = ["data_pipeline.worker", "transformers.models.bert.modeling_bert"]


class SlurmUnavailable(RuntimeError):
    """--slurm was asked for but no executor can be made (no sbatch on PATH, bad resources)."""


# ---------------------------------------------------------------------------- worker side
_PROCESSOR = None
_QUEUE = None


def _init_worker(cfg_dict: dict, queue, log_level: int, cli_pid: int) -> None:
    """Runs once per worker: manifest + text encoder are loaded here, not per shard. A worker is the
    forkserver's child, not the CLI's: it dies with the forkserver (parent-death signal) and watches the
    CLI's pid itself, so a CLI killed by any signal leaves no worker behind, and the forkserver, whose
    "clients alive" pipe the workers hold, exits once they are gone (data_pipeline.lifetime)."""
    global _PROCESSOR, _QUEUE
    die_with_parent()
    exit_when_process_exits(cli_pid)
    setup_logging(log_level)
    from common.config import from_dict
    from data_pipeline.worker import ShardProcessor

    _PROCESSOR = ShardProcessor(from_dict(ShardConfig, cfg_dict))
    _QUEUE = queue


def _report(ok: int, failed: int) -> None:
    _QUEUE.put((ok, failed))


def _run_in_worker(shard: int) -> dict:
    st = _PROCESSOR.run_shard(shard, progress=_report)
    st.pop("failures", None)  # they are in the shard JSON; the parent needs only the counts
    return st


def run_shard_group(cfg_dict: dict, shards: list[int], submitted_at: float = 0.0) -> list[int]:
    """One SLURM array task: its shards, skipping those a requeued earlier attempt already finished
    (finished after `submitted_at`; older finished shards were handed to us to be redone)."""
    setup_logging(logging.INFO)
    from common.config import from_dict
    from data_pipeline.worker import ShardProcessor

    cfg = from_dict(ShardConfig, cfg_dict)
    h = config_hash(cfg)

    def redo(s: int) -> bool:
        st = done_summary(cfg.out_dir, s, h)
        return st is None or st.get("finished", 0) < submitted_at

    todo = [s for s in shards if redo(s)]
    if todo:
        processor = ShardProcessor(cfg)
        for s in todo:
            st = processor.run_shard(s)
            log.info("shard %d: %d ok, %d failed", s, st["ok"], st["failed"])
    return todo


# ---------------------------------------------------------------------------- parent side
class _ProgressBar:
    """tqdm over videos (rate = videos/s, postfix = failures); fed by workers through a queue."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="video", disable=not enabled, smoothing=0.1, dynamic_ncols=True)
        self.failed = 0

    def update(self, ok: int, failed: int) -> None:
        self.failed += failed
        self.bar.update(ok + failed)
        if failed:
            self.bar.set_postfix(failed=self.failed, refresh=False)

    def close(self) -> None:
        self.bar.close()


def _transient(reason: str) -> bool:
    """Failures a later attempt may not repeat (network), as opposed to properties of the input."""
    return reason in ("timeout", "connection_error", "http_429") or reason.startswith("http_5")


def _pending_shards(cfg: ShardConfig, num_shards: int, retry_transient: bool = False) -> list[int]:
    h = config_hash(cfg)
    todo = []
    for s in range(num_shards):
        st = done_summary(cfg.out_dir, s, h)
        if st is None:
            todo.append(s)
        elif retry_transient and any(_transient(r) for r in st.get("by_reason", {})):
            todo.append(s)
    return todo


def _rows_in(shards: list[int], cfg: ShardConfig, total_rows: int) -> int:
    S = cfg.samples_per_shard
    return sum(min(S, total_rows - s * S) for s in shards)


def run_local(cfg: ShardConfig, todo: list[int], manifest: Manifest, progress: bool) -> None:
    bar = _ProgressBar(_rows_in(todo, cfg, len(manifest)), progress)
    try:
        if cfg.workers <= 1:
            from data_pipeline.worker import ShardProcessor

            processor = ShardProcessor(cfg, manifest)
            for s in todo:
                try:
                    processor.run_shard(s, progress=bar.update)
                except Exception as e:  # e.g. disk full: this shard stays unfinished, the others go on
                    log.error("shard %d failed: %s: %s (rerun to retry it)", s, type(e).__name__, e)
            return
        # Not fork: PyAV + fork can hang (DESIGN.md). A forkserver that has imported the worker's modules
        # (torch, PyAV, transformers' BERT; no container or decoder is opened there) forks each worker,
        # so their ~290 MB of imported code and data is shared copy-on-write: +~200 MB PSS per extra
        # worker instead of +~340 MB with spawn (BENCHMARKS.md, "The manifest at 10M rows").
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(WORKER_PRELOAD)
        queue = ctx.Queue()
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                try:
                    bar.update(*queue.get(timeout=0.2))
                except Exception:  # queue.Empty, or a closed queue at shutdown
                    continue

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        with cf.ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init_worker,
                                    initargs=(to_dict(cfg), queue, logging.getLogger().level, os.getpid())) as pool:
            futures = {pool.submit(_run_in_worker, s): s for s in todo}
            for fut in cf.as_completed(futures):
                try:
                    fut.result()
                except cf.process.BrokenProcessPool as e:
                    log.error("a worker process died (%s); unfinished shards stay for the rerun", e)
                    break
                except Exception as e:
                    log.error("shard %d failed: %s: %s (rerun to retry it)", futures[fut], type(e).__name__, e)
        stop.set()
        t.join(timeout=2)
        while not queue.empty():
            bar.update(*queue.get_nowait())
    finally:
        bar.close()


def run_slurm(cfg: ShardConfig, todo: list[int]) -> None:
    from common.submitit_executor import make_executor

    sc = cfg.slurm
    per_task = sc.shards_per_task or max(1, -(-len(todo) // max(1, sc.array_tasks)))
    groups = [todo[i:i + per_task] for i in range(0, len(todo), per_task)]
    try:
        ex = make_executor(Path(cfg.out_dir) / "slurm_logs" / "%j", nodes=1, tasks_per_node=1,
                           gpus_per_node=sc.gpus_per_node, cpus_per_task=sc.cpus_per_task, partition=sc.partition,
                           time_min=sc.time_min, array_parallelism=sc.nodes, job_name="vdm-shard",
                           cluster=sc.cluster)
    except (RuntimeError, ValueError) as e:
        raise SlurmUnavailable(str(e)) from e
    cfg_dict = to_dict(cfg)
    now = time.time()
    jobs = ex.map_array(run_shard_group, [cfg_dict] * len(groups), groups, [now] * len(groups))
    print(f"submitted {len(jobs)} array tasks for {len(todo)} shards: job {jobs[0].job_id.split('_')[0]}",
          file=sys.stderr)
    for job, group in zip(jobs, groups):
        try:
            job.result()
        except Exception as e:
            log.error("array task %s (shards %s..%s) failed: %s", job.job_id, group[0], group[-1], e)


def run(cfg: ShardConfig, *, slurm: bool = False, progress: bool = True, retry_transient: bool = False) -> Summary:
    cfg.validate()
    # absolute paths: SLURM tasks (and spawned workers) may start in another working directory
    cfg.out_dir = str(Path(cfg.out_dir).resolve())
    if "://" not in cfg.manifest:
        cfg.manifest = str(Path(cfg.manifest).resolve())
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.manifest_cache_dir and "://" not in cfg.manifest_cache_dir:
        cfg.manifest_cache_dir = str(Path(cfg.manifest_cache_dir).resolve())
    # parsed once into a mapped columnar file; workers and array tasks map the same file
    if cfg.source_root and "://" not in cfg.source_root:
        cfg.source_root = str(Path(cfg.source_root).resolve())
    manifest = Manifest(cfg.manifest, cfg.manifest_format, cfg.columns, cache_dir=manifest_cache_dir(cfg),
                        source_root=cfg.source_root)
    num_shards = manifest.num_shards(cfg.samples_per_shard)
    todo = _pending_shards(cfg, num_shards, retry_transient)
    removed = remove_temp_files(out)
    write_json_atomic(out / "shard_config.json", {"config": to_dict(cfg), "config_hash": config_hash(cfg)})
    print(f"{len(manifest)} rows ({manifest.format}, columns {manifest.columns}) → {num_shards} shards; "
          f"{num_shards - len(todo)} already finished, {len(todo)} to do"
          + (f"; removed {removed} temp files of an interrupted run" if removed else ""), file=sys.stderr)
    if todo:
        (run_slurm if slurm else lambda c, t: run_local(c, t, manifest, progress))(cfg, todo)
    c = cfg.clip
    clip = {"frames": c.frames, "height": c.height, "width": c.width, "fps": c.fps, "stride": c.stride}
    return merge_index(out, num_shards, config_hash(cfg), clip, cfg.storage.format)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.shard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML (configs/shard/*.yaml); fields of data_pipeline.config.ShardConfig")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set clip.frames=16 (repeatable)")
    p.add_argument("--manifest", help="manifest path (csv/parquet/jsonl)")
    p.add_argument("--source-root", help="directory or URL prefix that relative sources in the manifest are "
                                          "joined to (= source_root; default: the manifest's directory)")
    p.add_argument("--out", help="output directory (= out_dir)")
    p.add_argument("--workers", type=int, help="local worker processes")
    p.add_argument("--encoder", help="text encoder name or path (= encoder.name_or_path)")
    p.add_argument("--samples-per-shard", type=int)
    p.add_argument("--max-failure-ratio", type=float)
    p.add_argument("--retry-transient", action="store_true",
                   help="also redo finished shards that had network failures (timeout, connection, HTTP 5xx/429)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("-v", "--verbose", action="store_true")
    s = p.add_argument_group("SLURM (submitit array job; one task per group of shards)")
    s.add_argument("--slurm", action="store_true")
    s.add_argument("--partition")
    s.add_argument("--nodes", type=int, help="array tasks running at once (one node each)")
    s.add_argument("--time", type=int, help="minutes per array task")
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--gpus-per-node", type=int)
    s.add_argument("--array-tasks", type=int, help="split the shards over this many array tasks")
    return p


def config_from_args(args: argparse.Namespace) -> ShardConfig:
    flags = {"manifest": args.manifest, "source_root": args.source_root, "out_dir": args.out, "workers": args.workers,
             "encoder.name_or_path": args.encoder, "samples_per_shard": args.samples_per_shard,
             "max_failure_ratio": args.max_failure_ratio, "slurm.partition": args.partition,
             "slurm.nodes": args.nodes, "slurm.time_min": args.time, "slurm.cpus_per_task": args.cpus_per_task,
             "slurm.gpus_per_node": args.gpus_per_node, "slurm.array_tasks": args.array_tasks}
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    return load_config(ShardConfig, args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.INFO if args.verbose else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = config_from_args(args).validate()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg, slurm=args.slurm, progress=not args.no_progress,
                      retry_transient=args.retry_transient)
    except ManifestError as e:
        print(f"manifest error: {e}", file=sys.stderr)
        return 2
    except SlurmUnavailable as e:
        print(f"--slurm: {e}", file=sys.stderr)
        return 2
    print(summary.text(cfg.max_failure_ratio))
    if summary.missing_shards:
        return 2
    return 1 if summary.failure_ratio > cfg.max_failure_ratio else 0


if __name__ == "__main__":
    sys.exit(main())
