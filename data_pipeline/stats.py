"""Per-shard stats, the "is this shard finished?" test, the index merge and the run summary.

The shard JSON is the source of truth for resumption: a shard counts as finished only when its
JSON and tar both exist, the tar has the size the JSON recorded, and it was made with the same
content settings (config hash). The index is always rebuilt from the shard JSONs, so local
workers and SLURM array tasks need no coordination beyond the file system.

Layout of a shard JSON, chosen for 10,000-shard runs: the first line holds every summary field and
ends with `"failures": [`; then one failure per line; then `]}`. The whole file is ordinary JSON,
and `read_summary` parses only the first line, so the resume check and the index merge cost one
short read per shard however many rows failed (a shard of 1000 failed rows is ~150 KB).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.motion import MOTION_DEFINITION
from data_pipeline.writer import shard_name, stats_name, write_json_atomic, write_text_atomic

INDEX_VERSION = 1


@dataclass
class ShardStats:
    shard: int
    rows: tuple[int, int]  # [start, end) manifest rows
    config_hash: str
    ok: int = 0  # videos with at least one clip written
    samples: int = 0  # clips written (= tar samples)
    items: int = 0  # what could fail: a row, or each span of a row with clip spans
    failures: list[dict] = field(default_factory=list)  # {"key", "row", "reason", "detail"}
    tar_bytes: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time for the shard (throughput on a shared machine)
    # parts of cpu_seconds, so a planner can tell the work apart (data_pipeline.calibrate): the clip
    # encode (mp4/npy bytes) and the caption embedding (its CPU side only when the encoder is on a GPU,
    # hence its wall time too)
    encode_cpu_seconds: float = 0.0
    embed_cpu_seconds: float = 0.0
    embed_seconds: float = 0.0
    started: float = 0.0  # unix times (throughput over a parallel run; not part of sample content)
    finished: float = 0.0
    encoder: dict = field(default_factory=dict)
    # clips left out by a filter from sources that still gave samples (filter.min_motion with
    # clip.clips_per_video > 1); a source that gives none is a failure with the reason instead
    clips_filtered: Counter = field(default_factory=Counter)

    def fail(self, row: int, key: str, reason: str, detail: str = "") -> None:
        self.failures.append({"row": row, "key": key, "reason": reason, "detail": detail[:500]})

    def to_json(self) -> dict:
        return {
            "version": INDEX_VERSION, "shard": self.shard, "name": shard_name(self.shard),
            "rows": list(self.rows), "config_hash": self.config_hash, "ok": self.ok, "samples": self.samples,
            "failed": len(self.failures), "items": self.items, "by_reason": dict(sorted(Counter(f["reason"] for f in self.failures).items())),
            "failures": self.failures, "tar_bytes": self.tar_bytes, "seconds": round(self.seconds, 3), "cpu_seconds": round(self.cpu_seconds, 3),
            "encode_cpu_seconds": round(self.encode_cpu_seconds, 4), "embed_cpu_seconds": round(self.embed_cpu_seconds, 4),
            "embed_seconds": round(self.embed_seconds, 4),
            "started": round(self.started, 3), "finished": round(self.finished, 3),
            "encoder": self.encoder, "clips_filtered": dict(sorted(self.clips_filtered.items())),
        }


FAILURES_TAIL = ', "failures": ['
SUMMARY_FIELDS = ("shard", "rows", "config_hash", "ok", "samples", "failed", "by_reason", "tar_bytes")


def read_stats(out_dir: str | Path, shard: int) -> dict | None:
    """The whole shard JSON (with every failure), or None when absent or unreadable."""
    try:
        return json.loads((Path(out_dir) / stats_name(shard)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_summary(out_dir: str | Path, shard: int) -> dict | None:
    """The shard JSON without its failure list, reading only its first line (see the module doc);
    files in another layout (older runs) are parsed whole. None when absent or unreadable."""
    try:
        with open(Path(out_dir) / stats_name(shard), encoding="utf-8") as f:
            first = f.readline()
            if first.endswith(FAILURES_TAIL + "\n"):
                summary = json.loads(first[: -len(FAILURES_TAIL) - 1] + "}")
                if all(k in summary for k in SUMMARY_FIELDS):
                    return summary
            full = json.loads(first + f.read())
    except (OSError, ValueError):
        return None
    if not isinstance(full, dict):
        return None
    full.pop("failures", None)
    return full


def done_summary(out_dir: str | Path, shard: int, config_hash: str) -> dict | None:
    """The summary of a finished shard (JSON + tar of the recorded size, same config hash), else None."""
    st = read_summary(out_dir, shard)
    if not st or st.get("config_hash") != config_hash:
        return None
    try:
        size = (Path(out_dir) / shard_name(shard)).stat().st_size
    except OSError:
        return None
    return st if size == st.get("tar_bytes") else None


def stats_text(st: dict) -> str:
    """Summary fields on the first line, then one failure per line (compact: C-speed json.dumps)."""
    head = {k: v for k, v in st.items() if k != "failures"}
    lines = [json.dumps(head, sort_keys=True, ensure_ascii=False)[:-1] + FAILURES_TAIL]
    lines.append(",\n".join(json.dumps(f, sort_keys=True, ensure_ascii=False) for f in st.get("failures", [])))
    lines.append("]}\n")
    return "\n".join(lines)


def write_stats(out_dir: str | Path, stats: ShardStats) -> None:
    write_text_atomic(Path(out_dir) / stats_name(stats.shard), stats_text(stats.to_json()))


@dataclass
class Summary:
    rows: int
    ok: int
    samples: int
    failed: int
    by_reason: dict[str, int]
    shards: int
    missing_shards: list[int]
    items: int = 0  # rows, counting a row with clip spans once per span; 0 = same as rows
    clips_filtered: dict[str, int] = field(default_factory=dict)  # clips dropped from sources that gave samples

    @property
    def failure_ratio(self) -> float:
        items = self.items or self.rows
        return self.failed / items if items else 0.0

    def text(self, max_ratio: float) -> str:
        spans = f" ({self.items} spans)" if self.items and self.items != self.rows else ""
        lines = [f"{self.rows} rows{spans} → {self.ok} videos ok, {self.samples} clips in {self.shards} shards; "
                 f"{self.failed} failed ({self.failure_ratio:.1%})"]
        for reason, n in sorted(self.by_reason.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason}: {n}")
        for reason, n in sorted(self.clips_filtered.items()):
            lines.append(f"  {n} more clips left out ({reason}) from videos that gave other clips")
        if self.missing_shards:
            lines.append(f"UNFINISHED shards: {self.missing_shards[:20]}{' ...' if len(self.missing_shards) > 20 else ''}"
                         " (rerun the same command to finish them)")
        if self.failure_ratio > max_ratio:
            lines.append(f"FAILED: failure ratio {self.failure_ratio:.1%} > --max-failure-ratio {max_ratio:.1%}")
        return "\n".join(lines)


def merge_index(out_dir: str | Path, num_shards: int, config_hash: str, clip: dict, fmt: str) -> Summary:
    """Write index.json from the finished shards' stats; returns the run summary.

    One short read per shard (`read_summary`: its first line) plus a stat of its tar, in one pass:
    10,000 shards merge in about a second (bench/bench_manifest.py).
    """
    out_dir = Path(out_dir)
    entries, reasons, filtered = [], Counter(), Counter()
    ok = samples = failed = rows = items = 0
    missing, encoder = [], {}
    for n in range(num_shards):
        st = done_summary(out_dir, n, config_hash)
        if st is None:
            missing.append(n)
            continue
        entries.append({"name": shard_name(n), "count": st["samples"]})
        ok, samples, failed = ok + st["ok"], samples + st["samples"], failed + st["failed"]
        rows += st["rows"][1] - st["rows"][0]
        items += st.get("items") or st["rows"][1] - st["rows"][0]  # shard JSONs from before `items`
        reasons.update(st["by_reason"])
        filtered.update(st.get("clips_filtered") or {})
        encoder = encoder or st.get("encoder", {})
    index = {
        "version": INDEX_VERSION, "shards": entries, "total": samples,
        "encoder": {"name": encoder.get("name", ""), "dim": encoder.get("dim", 0)},
        "clip": clip, "format": fmt, "config_hash": config_hash,
        "videos_ok": ok, "failed": failed, "by_reason": dict(sorted(reasons.items())),
        "clips_filtered": dict(sorted(filtered.items())), "motion": MOTION_DEFINITION, "complete": not missing,
    }
    write_json_atomic(out_dir / "index.json", index)
    return Summary(rows=rows, ok=ok, samples=samples, failed=failed, by_reason=dict(reasons),
                   shards=len(entries), missing_shards=missing, items=items, clips_filtered=dict(filtered))
