"""Manifest (csv / parquet / jsonl) → an Arrow table of (key, source, caption) → rows of one shard.

Why Arrow and not a list of Python rows: a WebVid-10M manifest is 10M rows, and every worker (and
every SLURM array task) needs random access to its own shards' rows. Columnar binary columns take a
fraction of the memory of Python objects, slicing is free, and nothing is pickled to workers.
At 10M rows even one Arrow copy per process is too much (~2 GB each), so the sharding run parses
the manifest once, block by block, into a read-only Arrow IPC file (`open_manifest_cache`) that the
parent, its workers and SLURM array tasks memory-map: one copy of the pages per node, shared.
Columns are read as raw bytes so that a non-UTF-8 caption becomes a per-row failure, not a crash.
Row order is the file order; shard N is rows N*S .. (N+1)*S-1, so ids are stable across reruns.
"""

from __future__ import annotations

import ast
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc  # noqa: F401  (pa.ipc)

from data_pipeline.config import ColumnsConfig

log = logging.getLogger(__name__)

# Candidates, in order, when a column is not named in the config (ours first, then WebVid-10M's).
# OpenVid-1M's `video` (a clip file name) is last in both key and source: it is the only candidate
# in its CSV, and a manifest with a `video` column next to a real key or path column keeps those.
KEY_COLUMNS = ("key", "videoid", "video_id", "id", "videoID", "YoutubeID", "video")
SOURCE_COLUMNS = ("path", "url", "contentUrl", "video_path", "video_url", "source", "video")
CAPTION_COLUMNS = ("caption", "name", "text", "title", "Caption")
# Clip spans (docs/data_pipeline.md): a list column of [start, end] pairs (Panda-70M `timestamp`)
# or of clip records holding one (HD-VILA-100M `clip`: {"clip_id", "span": [start, end]}), or a
# start and an end column per row (InternVid `Start_timestamp`/`End_timestamp`).
SPAN_COLUMNS = ("timestamp", "timestamps", "spans", "clip", "clips")
CLIP_SPAN_FIELDS = ("span", "timestamp")  # where a clip record keeps its [start, end]
START_COLUMNS = ("start", "start_time", "Start_timestamp", "clip_start")
END_COLUMNS = ("end", "end_time", "End_timestamp", "clip_end")

BATCH_ROWS = 65536  # rows per record batch (parquet / jsonl); CSV batches are CSV_BLOCK_BYTES of text
# pyarrow's streaming CSV reader reads blocks well ahead of the consumer (at 16 MiB blocks it held the
# whole of a 300 MB manifest before the second batch), so peak memory is a multiple of this: 1 MiB
# (pyarrow's own default) kept a 240 MiB manifest's build at +56 MiB over a tiny one's, and
# built a 1M-row copy in 3.3 s vs 6.4 s at 16 MiB on our 2 cores (tests/test_manifest_cache.py bounds it)
CSV_BLOCK_BYTES = 1 << 20
IDENTITY_SPAN = 1 << 20  # bytes hashed at each end of the manifest for its identity
CACHE_VERSION = 3  # bump when the mapped layout or the parsing changes: old copies are then rebuilt
ROWS_FILE, DUP_FILE, META_FILE = "rows.arrow", "occurrence.npy", "meta.json"
TMP_MARK = ".tmp-"

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_UNSAFE_KEY = re.compile(r"[/\\\x00-\x1f]|\.\.")


class ManifestError(ValueError):
    """The manifest as a whole is unusable (missing file, missing column); names the file."""


@dataclass(frozen=True)
class Span:
    """One clip span of a row: its own sample `{key}_{index:03d}`, decoded only inside [start_s, end_s)."""

    index: int
    start_s: float
    end_s: float
    caption: str
    reject: str | None = None  # bad_span / empty_caption / caption_not_utf8, known before any download
    detail: str = ""
    clip_id: str = ""  # the clip record's own id (HD-VILA `clip_id`), kept in the sample's JSON for joins


@dataclass(frozen=True)
class Row:
    index: int  # 0-based data row number in the manifest (stable id)
    key: str  # sanitised sample key ("" when rejected)
    raw_key: str
    source: str
    caption: str
    reject: str | None = None  # failure reason known before any download (bad key, bad caption, ...)
    spans: tuple[Span, ...] | None = None  # None: the whole video (no span columns)


def detect_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for suffix, kind in ((".csv", "csv"), (".tsv", "csv"), (".parquet", "parquet"), (".pq", "parquet"),
                         (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix) or name.endswith(suffix + ".gz"):
            return kind
    raise ManifestError(f"manifest {path}: cannot infer the format from the suffix; set manifest_format")


def _pick(names: list[str], wanted: str, candidates: tuple[str, ...], what: str, path: str) -> str:
    if wanted:
        if wanted not in names:
            raise ManifestError(f"manifest {path}: column {wanted!r} (columns.{what}) not found; columns: {names}")
        return wanted
    for c in candidates:
        if c in names:
            return c
    raise ManifestError(f"manifest {path}: no {what} column (tried {list(candidates)}); columns: {names}; "
                        f"set columns.{what}")


def _csv_header(path: str) -> list[str]:
    import csv
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
        return next(csv.reader(f, delimiter="\t" if ".tsv" in path else ","), [])


def _pick_optional(names: list[str], wanted: str, candidates: tuple[str, ...], what: str, path: str) -> str | None:
    if wanted:
        return _pick(names, wanted, candidates, what, path)
    return next((c for c in candidates if c in names), None)


def _pick3(names: list[str], cols: ColumnsConfig, path: str) -> dict[str, str]:
    """Role → column name: key, source, caption, then either spans or start + end when present.

    The caption column may be missing only beside a spans list: HD-VILA-100M's clip records carry
    no caption (its captions are a separate file) and derived sets put one inside each clip record,
    so captions are looked up per clip and a clip with none fails alone (`empty_caption`)."""
    picked = {"key": _pick(names, cols.key, KEY_COLUMNS, "key", path),
              "source": _pick(names, cols.source, SOURCE_COLUMNS, "source", path)}
    spans = _pick_optional(names, cols.spans, SPAN_COLUMNS, "spans", path)
    start = _pick_optional(names, cols.start, START_COLUMNS, "start", path)
    end = _pick_optional(names, cols.end, END_COLUMNS, "end", path)
    span_list = bool(spans and not (cols.start or cols.end))
    caption = (_pick_optional if span_list else _pick)(names, cols.caption, CAPTION_COLUMNS, "caption", path)
    if caption:
        picked["caption"] = caption
    else:
        log.warning("manifest %s: no caption column (tried %s); each clip record of %r must carry its own "
                    "caption, clips without one fail as empty_caption", path, list(CAPTION_COLUMNS), spans)
    if span_list:
        picked["spans"] = spans
    elif start or end:
        if not (start and end):
            raise ManifestError(f"manifest {path}: a clip start column needs an end column and vice versa "
                                f"(found start={start!r}, end={end!r}); set columns.start and columns.end")
        picked["start"], picked["end"] = start, end
    return picked


def _as_binary(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Any column type as binary (ints → their decimal text), so every reader yields one type."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_binary(arr.type):
        return arr
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_struct(arr.type):
        # spans / captions lists and clip records as JSON text (default=str: dates, decimals, ...)
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str).encode("utf-8")
                         for v in arr.to_pylist()], type=pa.binary())
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = pc.cast(arr, pa.string())
    return pc.cast(arr, pa.binary())


Batches = Iterator[tuple[pa.Array, pa.Array, pa.Array]]


def _read_csv(path: str, cols: ColumnsConfig) -> tuple[tuple[str, str, str], Batches]:
    """Block-wise (pyarrow.csv.open_csv): peak memory is the blocks read ahead, not the whole file."""
    import pyarrow.csv as pcsv

    picked = _pick3(_csv_header(path), cols, path)
    bad_rows: list[int] = []

    def on_invalid(row) -> str:  # rows with a wrong field count: skipped, but said out loud
        bad_rows.append(row.number)
        return "skip"

    def batches() -> Batches:
        reader = pcsv.open_csv(
            path,
            read_options=pcsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
            parse_options=pcsv.ParseOptions(delimiter="\t" if ".tsv" in path else ",", newlines_in_values=True,
                                            invalid_row_handler=on_invalid),
            convert_options=pcsv.ConvertOptions(column_types={c: pa.binary() for c in set(picked.values())},
                                                include_columns=list(dict.fromkeys(picked.values()))),
        )
        for batch in reader:
            yield tuple(batch.column(batch.schema.get_field_index(c)) for c in picked.values())
        if bad_rows:
            log.warning("manifest %s: skipped %d malformed CSV lines (wrong field count), e.g. line %s",
                        path, len(bad_rows), bad_rows[0])

    return picked, batches()


def _read_parquet(path: str, cols: ColumnsConfig) -> tuple[tuple[str, str, str], Batches]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    picked = _pick3(f.schema_arrow.names, cols, path)

    def batches() -> Batches:
        for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=list(dict.fromkeys(picked.values()))):
            yield tuple(_as_binary(batch.column(batch.schema.get_field_index(c))) for c in picked.values())

    return picked, batches()


def _read_jsonl(path: str, cols: ColumnsConfig) -> tuple[tuple[str, str, str], Batches]:
    """Line by line, so a broken line is one failed row (its position kept), not a failed file.
    Columns are picked from the keys of the first 1000 records; rows go out BATCH_ROWS at a time."""
    import gzip
    import itertools

    opener = gzip.open if path.endswith(".gz") else open

    def records(f) -> Iterator[dict]:
        for raw in f:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8", errors="surrogateescape"))
                yield rec if isinstance(rec, dict) else {}
            except json.JSONDecodeError:
                yield {}

    f = opener(path, "rb")
    it = records(f)
    first = list(itertools.islice(it, BATCH_ROWS))
    names = sorted({k for r in first[:1000] for k in r})
    try:
        picked = _pick3(names, cols, path)
    except ManifestError:
        f.close()
        raise

    def col(recs: list[dict], name: str) -> pa.Array:
        out = []
        for r in recs:
            v = r.get(name)
            if isinstance(v, (list, dict)):  # a list of spans or captions: kept as JSON text
                v = json.dumps(v, ensure_ascii=False)
            out.append(None if v is None else str(v).encode("utf-8", errors="surrogateescape"))
        return pa.array(out, type=pa.binary())

    def batches() -> Batches:
        with f:
            chunk = first
            while chunk:
                yield tuple(col(chunk, c) for c in picked.values())
                chunk = list(itertools.islice(it, BATCH_ROWS))

    return picked, batches()


READERS = {"csv": _read_csv, "parquet": _read_parquet, "jsonl": _read_jsonl}


def key_occurrence(keys: pa.ChunkedArray, exact: bool = False) -> np.ndarray:
    """uint32 per row: 0 for the first row with its key, > 0 for later ones (vectorised).

    exact=False (the common case): 1 for every later row, found with a hash group-by (10M rows in
    seconds). exact=True, for manifests with a start/end column per row, where several rows are
    clips of one video: the number of earlier rows with that key (the clip's span number), found by
    a stable sort of the keys.
    """
    n = len(keys)
    keys = keys if isinstance(keys, pa.ChunkedArray) else pa.chunked_array([keys])
    idx = np.arange(n, dtype=np.int64)
    if not exact:
        firsts = pa.table({"k": keys, "i": pa.array(idx)}).group_by("k").aggregate([("i", "min")]).column("i_min")
        occ = np.ones(n, dtype=np.uint32)
        occ[firsts.to_numpy()] = 0
        return occ
    if n == 0:
        return np.zeros(0, dtype=np.uint32)
    order = pc.sort_indices(pa.table({"k": keys, "i": pa.array(idx)}),
                            sort_keys=[("k", "ascending"), ("i", "ascending")]).to_numpy()
    sorted_keys = pc.take(keys, pa.array(order)).combine_chunks()
    same = pc.equal(sorted_keys.slice(1), sorted_keys.slice(0, n - 1)).fill_null(True).to_numpy(zero_copy_only=False)
    first_of_group = np.maximum.accumulate(np.where(np.concatenate([[True], ~same]), idx, 0))
    occ = np.empty(n, dtype=np.uint32)
    occ[order] = (idx - first_of_group).astype(np.uint32)
    return occ


# ---------------------------------------------------------------------------- the mapped copy
def manifest_identity(path: str, kind: str, columns: ColumnsConfig) -> dict:
    """What a mapped copy is valid for: the file (path, size, mtime, hash of its first and last MiB),
    the format and the column mapping. Any change to these gives another copy; a manifest edited in
    its middle with size and mtime restored is not detected (documented)."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= 2 * IDENTITY_SPAN:
            h.update(f.read())
        else:
            h.update(f.read(IDENTITY_SPAN))
            f.seek(st.st_size - IDENTITY_SPAN)
            h.update(f.read(IDENTITY_SPAN))
    return {"version": CACHE_VERSION, "path": os.path.realpath(path), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "head_tail_sha256": h.hexdigest(), "format": kind,
            "columns": dataclasses.asdict(columns)}  # every role: a copy is only valid for its own mapping


def _identity_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _open_mapped(entry: Path, identity: dict) -> tuple[pa.Table, np.ndarray, dict] | None:
    """The mapped copy in `entry`, or None (with the reason logged) when it is absent or does not
    match `identity` exactly."""
    try:
        meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("identity") != identity:
        log.warning("manifest cache %s does not match the manifest (%s); rebuilding", entry, meta.get("identity"))
        return None
    try:
        table = pa.ipc.open_file(pa.memory_map(str(entry / ROWS_FILE), "r")).read_all()
        dup = np.load(entry / DUP_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, pa.ArrowInvalid, ValueError) as e:
        log.warning("manifest cache %s is unreadable (%s); rebuilding", entry, e)
        return None
    if table.num_rows != meta.get("rows") or dup.shape != (table.num_rows,) or dup.dtype != np.uint32:
        log.warning("manifest cache %s has %d rows, %s duplicate flags, expected %s; rebuilding",
                    entry, table.num_rows, dup.shape, meta.get("rows"))
        return None
    return table, dup, meta


def _build_mapped(entry: Path, path: str, kind: str, columns: ColumnsConfig, identity: dict) -> None:
    """Stream the manifest into `entry` (Arrow IPC file + duplicate flags + meta), atomically: written
    under a temporary name and renamed, so a reader sees a whole copy or none."""
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        picked, batches = READERS[kind](path, columns)
        schema = pa.schema([(role, pa.binary()) for role in picked])
        keys: list[pa.Array] = []
        rows = 0
        with pa.OSFile(str(tmp / ROWS_FILE), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for cols in batches:
                writer.write_batch(pa.record_batch(list(cols), schema=schema))
                keys.append(cols[0])
                rows += len(cols[0])
        dup = key_occurrence(pa.chunked_array(keys, type=pa.binary()), exact="start" in picked)
        del keys
        np.save(tmp / DUP_FILE, dup, allow_pickle=False)
        meta = {"identity": identity, "rows": rows, "columns": list(picked.values()), "roles": list(picked),
                "format": kind}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
        for name in (ROWS_FILE, DUP_FILE, META_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        os.rename(tmp, entry)  # fails if a concurrent builder got there first: theirs is as good
    except OSError:
        if not entry.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        pa.default_memory_pool().release_unused()


def _remove_stale(cache_dir: Path, identity: dict, keep: str) -> None:
    """Copies of the same manifest path, format and mapping with another identity (the manifest
    changed since); copies for other column mappings stay."""
    for meta_path in cache_dir.glob(f"*/{META_FILE}"):
        entry = meta_path.parent
        if entry.name == keep or TMP_MARK in entry.name:
            continue
        try:
            old = json.loads(meta_path.read_text(encoding="utf-8")).get("identity", {})
        except (OSError, ValueError):
            continue
        if all(old.get(f) == identity[f] for f in ("path", "format", "columns")):
            shutil.rmtree(entry, ignore_errors=True)  # mapped elsewhere? Linux keeps unlinked pages alive
            (cache_dir / f"{entry.name}.lock").unlink(missing_ok=True)


def open_manifest_cache(path: str, kind: str, columns: ColumnsConfig, cache_dir: str | Path
                        ) -> tuple[pa.Table, np.ndarray, dict, Path]:
    """Map the manifest's columnar copy in `cache_dir`, building it first when absent or stale.

    Concurrent callers (local workers, SLURM array tasks sharing a file system) serialise on a lock
    file, so one builds and the rest map its result; without working locks (some network file
    systems) each may build, and the atomic rename still leaves exactly one whole copy.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    identity = manifest_identity(path, kind, columns)
    key = _identity_key(identity)
    entry = cache_dir / key
    found = _open_mapped(entry, identity)
    if found is None:
        with open(cache_dir / f"{key}.lock", "a+b") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            except OSError as e:  # e.g. a file system without flock: the rename still keeps it whole
                log.info("manifest cache: no lock on %s (%s); building without it", cache_dir, e)
            for _attempt in range(3):  # without a lock a concurrent builder may swap the copy under us
                found = _open_mapped(entry, identity)  # a concurrent builder may have finished meanwhile
                if found is not None:
                    break
                if entry.exists():  # damaged or foreign: moved aside first, so no reader sees it half-deleted
                    aside = entry.with_name(f"{entry.name}{TMP_MARK}stale-{os.getpid()}")
                    try:
                        os.rename(entry, aside)
                    except OSError:
                        pass
                    shutil.rmtree(aside, ignore_errors=True)
                t0 = time.perf_counter()
                _build_mapped(entry, path, kind, columns, identity)
                found = _open_mapped(entry, identity)
                if found is not None:
                    log.info("manifest %s: %d rows → %s in %.1f s", path, found[2]["rows"], entry,
                             time.perf_counter() - t0)
                    _remove_stale(cache_dir, identity, key)
                    break
            if found is None:
                raise ManifestError(f"manifest {path}: the columnar copy in {entry} could not be read back")
    table, dup, meta = found
    return table, dup, meta, entry


class Manifest:
    """The manifest as three binary columns plus which rows repeat an earlier key.

    With `cache_dir`, the columns live in a memory-mapped Arrow IPC file there (built once, see
    open_manifest_cache), so every process on a node shares the same physical pages and a process
    only pages in the rows it reads. Without it (or for a URL manifest) they are parsed into memory.

    Relative sources (OpenVid-1M's `abc_0.mp4`) are joined to `source_root`, by default the
    manifest's own directory (see resolve_source); the copy keeps them as written, so moving the
    videos needs a new root, not a new copy.
    """

    def __init__(self, path: str, fmt: str = "auto", columns: ColumnsConfig | None = None,
                 cache_dir: str | Path | None = None, source_root: str = ""):
        self.path = str(path)
        is_url = "://" in self.path
        if not Path(self.path).exists() and not is_url:
            raise ManifestError(f"manifest {self.path} does not exist")
        self.source_root = source_root or default_source_root(self.path)
        kind = detect_format(self.path, fmt)
        columns = columns or ColumnsConfig()
        self.format = kind
        self.cache_path: Path | None = None
        if cache_dir is not None and not is_url:
            table, self._occurrence, meta, self.cache_path = open_manifest_cache(self.path, kind, columns, cache_dir)
            picked = dict(zip(meta["roles"], meta["columns"]))
        else:
            picked, batches = READERS[kind](self.path, columns)
            schema = pa.schema([(role, pa.binary()) for role in picked])
            table = pa.Table.from_batches([pa.record_batch(list(b), schema=schema) for b in batches], schema=schema)
            self._occurrence = key_occurrence(table.column("key"), exact="start" in picked)
        self.columns = (picked["key"], picked["source"], picked.get("caption"))  # caption None: per clip record
        # clip spans: {"spans": name} (a list per row) or {"start": name, "end": name}, or {}
        self.span_columns = {r: picked[r] for r in ("spans", "start", "end") if r in picked}
        self._set_table(table)

    def _set_table(self, table: pa.Table) -> None:
        self.keys = table.column("key")
        self.sources = table.column("source")
        self.captions = table.column("caption") if "caption" in table.column_names else None
        self._span_cols = {r: table.column(r) for r in self.span_columns}

    def remap(self) -> None:
        """Map the copy afresh and let go of the old mapping. A process's RSS counts every page of a
        mapping it has touched; a worker that walked through 5,000 shards would hold half the file
        (~1 GB at 10M rows) in its RSS. Unmapping now and then keeps it to the recent shards; the
        pages stay in the page cache, shared, so nothing is re-read from disk."""
        if self.cache_path is None:
            return
        table = pa.ipc.open_file(pa.memory_map(str(self.cache_path / ROWS_FILE), "r")).read_all()
        occurrence = np.load(self.cache_path / DUP_FILE, mmap_mode="r", allow_pickle=False)
        if table.num_rows != len(self) or occurrence.shape != self._occurrence.shape:
            raise ManifestError(f"manifest copy {self.cache_path} changed under a running job")
        self._set_table(table)
        self._occurrence = occurrence

    def __len__(self) -> int:
        return len(self.keys)

    def num_shards(self, samples_per_shard: int) -> int:
        return (len(self) + samples_per_shard - 1) // samples_per_shard

    def shard_rows(self, shard: int, samples_per_shard: int) -> list[Row]:
        start = shard * samples_per_shard
        end = min(start + samples_per_shard, len(self))
        if end <= start:
            return []
        keys = self.keys.slice(start, end - start).to_pylist()
        sources = self.sources.slice(start, end - start).to_pylist()
        captions = ([None] * (end - start) if self.captions is None
                    else self.captions.slice(start, end - start).to_pylist())
        occ = self._occurrence[start:end].tolist()
        root = self.source_root
        if not self._span_cols:
            return [make_row(start + i, keys[i], sources[i], captions[i], occ[i] > 0, root=root)
                    for i in range(end - start)]
        extra = {r: c.slice(start, end - start).to_pylist() for r, c in self._span_cols.items()}
        rows = []
        for i in range(end - start):
            if "spans" in extra:
                row = make_row(start + i, keys[i], sources[i], captions[i], occ[i] > 0, spans_b=extra["spans"][i],
                               root=root)
            else:  # one span per row; rows of the same video are its spans 0, 1, ... in file order
                row = make_row(start + i, keys[i], sources[i], captions[i], False,
                               span=(occ[i], extra["start"][i], extra["end"][i]), root=root)
            rows.append(row)
        return rows


def default_source_root(manifest: str) -> str:
    """Where relative sources live when no source_root is set: the manifest's own directory (a URL
    manifest's parent URL). Not the process's working directory, which differs between the shell, a
    spawned worker and a SLURM array task, while a published manifest sits next to its clips."""
    if "://" in manifest:
        return manifest.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(manifest))


def resolve_source(source: str, root: str) -> str:
    """`source` joined to `root` when it is a relative path; absolute paths and URLs (file://,
    http(s)://, s3://, ...) name their file already and are never joined. A URL root (an fsspec
    prefix such as s3://bucket/openvid) is joined with `/`, a local one as a path."""
    if not root or not source.strip() or "://" in source or os.path.isabs(source):
        return source
    if "://" in root:
        return f"{root.rstrip('/')}/{source}"
    return os.path.join(root, source)


def sanitise_key(raw: str) -> tuple[str, str | None]:
    """(key, reject reason). Path-like keys are refused; other odd characters are replaced.

    Keys name tar members, and webdataset splits a member name at its first '.', so a key may only
    hold [A-Za-z0-9_-]. A replaced key gets a hash suffix of the original so two different raw keys
    never collide, and the same raw key always maps to the same key (stable across reruns).
    """
    if not raw or not raw.strip():
        return "", "bad_key"
    if _UNSAFE_KEY.search(raw):
        return "", "unsafe_key"
    if _SAFE_KEY.match(raw):
        return raw, None
    cleaned = re.sub(r"[^A-Za-z0-9_-]", "_", raw)[:100]
    digest = hashlib.sha1(raw.encode("utf-8", errors="surrogateescape")).hexdigest()[:8]
    return f"{cleaned}-{digest}", None


def _text(value: bytes | None) -> tuple[str, bool]:
    """bytes → (str, is valid UTF-8); invalid bytes survive as surrogate escapes for the log."""
    if value is None:
        return "", True
    try:
        return value.decode("utf-8"), True
    except UnicodeDecodeError:
        return value.decode("utf-8", errors="surrogateescape"), False


def _utf8_ok(text: str, ok: bool) -> bool:
    if ok:
        try:  # JSON escapes can smuggle lone surrogates into an otherwise valid line
            text.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return ok


def parse_time(value) -> float | None:
    """Seconds from a number, "12.5", "MM:SS(.mmm)" or "HH:MM:SS(.mmm)"; None when it is none of these."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        v = float(value)
    else:
        text = str(value).strip()
        parts = text.split(":")
        if not text or len(parts) > 3:
            return None
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            return None
        if len(parts) > 1 and (any(n < 0 for n in nums) or any(n >= 60 for n in nums[1:])):
            return None
        v = 0.0
        for n in nums:
            v = v * 60 + n
    return v if math.isfinite(v) else None


def _literal_list(text: str):
    """A list cell: JSON, or a Python literal (Panda-70M's CSV writes `[['0:00:00.000', ...]]`).
    ast.literal_eval only builds literals (no code runs); cells over 1 MB are refused."""
    if len(text) > 1 << 20:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None


def _span(index: int, start, end, caption: str, caption_ok: bool, clip_id: str = "") -> Span:
    s, e = parse_time(start), parse_time(end)
    if s is None or e is None:
        return Span(index, 0.0, 0.0, "", "bad_span", f"span {index}: unreadable time in [{start!r}, {end!r}]", clip_id)
    if s < 0 or e <= s:
        return Span(index, s, e, "", "bad_span", f"span {index}: [{s:g}, {e:g}] is empty, inverted or negative",
                    clip_id)
    if not caption_ok:
        return Span(index, s, e, "", "caption_not_utf8", "", clip_id)
    if not caption.strip():
        return Span(index, s, e, "", "empty_caption",
                    f"span {index}: no caption in its clip record or in the row's caption column", clip_id)
    return Span(index, s, e, caption.strip(), clip_id=clip_id)


def _span_item(item) -> tuple[object, object, str | None, str] | None:
    """One element of a spans list → (start, end, its own caption or None, clip id), or None when it
    is neither a [start, end] pair (Panda-70M) nor a clip record holding one (HD-VILA-100M:
    {"clip_id": "x.1.mp4", "span": [start, end]}, derived sets add a "caption")."""
    if isinstance(item, (list, tuple)):
        return (item[0], item[1], None, "") if len(item) == 2 else None
    if not isinstance(item, dict):
        return None
    pair = next((item[f] for f in CLIP_SPAN_FIELDS if f in item), None)
    if pair is None and "start" in item and "end" in item:
        pair = (item["start"], item["end"])
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        return None
    caption = next((item[f] for f in CAPTION_COLUMNS if isinstance(item.get(f), str)), None)
    clip_id = item.get("clip_id")
    return pair[0], pair[1], caption, "" if clip_id is None else str(clip_id)


def _row_captions(caption: str, caption_ok: bool, n: int) -> list[str] | None:
    """The row's caption for each of its n spans: one text for all, or a list parallel to the spans
    (Panda-70M); None when that list cannot be matched to the spans."""
    if caption_ok and caption.lstrip().startswith("["):
        parsed = _literal_list(caption)
        if isinstance(parsed, (list, tuple)):
            if len(parsed) != n or not all(isinstance(c, str) for c in parsed):
                return None
            return list(parsed)
    return [caption] * n


def _spans_from_list(spans_b: bytes | None, caption: str, caption_ok: bool) -> tuple[tuple[Span, ...], str | None]:
    """(spans, row reject). A clip record's own caption wins; otherwise the row's caption (one text,
    or a list parallel to the spans). An element that is no span fails alone (`bad_span`)."""
    text, ok = _text(spans_b)
    items = _literal_list(text) if ok and text.strip() else None
    if not isinstance(items, (list, tuple)):
        return (), "bad_span"
    captions = _row_captions(caption, caption_ok, len(items))
    if captions is None:
        return (), "bad_span"  # captions that cannot be matched to spans
    spans = []
    for i, (item, row_caption) in enumerate(zip(items, captions)):
        parsed = _span_item(item)
        if parsed is None:
            spans.append(Span(i, 0.0, 0.0, "", "bad_span", f"span {i}: not a [start, end] pair or a clip record "
                                                             f"with a {'/'.join(CLIP_SPAN_FIELDS)}: {item!r:.80}"))
            continue
        start, end, own, clip_id = parsed
        text_i, ok_i = (own, True) if own is not None else (row_caption, caption_ok)
        spans.append(_span(i, start, end, text_i, _utf8_ok(text_i, ok_i), clip_id))
    return tuple(spans), None


def make_row(index: int, key_b: bytes | None, source_b: bytes | None, caption_b: bytes | None,
             duplicate: bool = False, *, spans_b: bytes | None = None,
             span: tuple[int, bytes | None, bytes | None] | None = None, root: str = "") -> Row:
    """One manifest row → Row. spans_b: the row's list of [start, end] pairs or clip records (list
    column); span: (span number, start, end) of a row that is one clip (start/end columns);
    root: what a relative source is joined to (resolve_source)."""
    raw_key, key_ok = _text(key_b)
    source, source_ok = _text(source_b)
    source = resolve_source(source, root)
    caption, caption_ok = _text(caption_b)
    caption_ok = _utf8_ok(caption, caption_ok)
    key, reject = sanitise_key(raw_key) if key_ok else ("", "bad_key")
    if reject is None and duplicate:
        reject = "duplicate_key"
    if reject is None and not source.strip():
        reject = "missing_source"
    spans: tuple[Span, ...] | None = None
    if spans_b is not None or span is not None:
        if span is not None:
            s_text, e_text = _text(span[1])[0], _text(span[2])[0]
            spans = (_span(span[0], s_text, e_text, caption, caption_ok),)
        else:
            spans, span_reject = _spans_from_list(spans_b, caption, caption_ok)
            reject = reject or span_reject
        if reject is None and not spans:
            reject = "bad_span"  # an empty list: nothing to cut
        caption = caption if caption_ok else ""
    elif reject is None and not caption_ok:
        reject = "caption_not_utf8"
    elif reject is None and not caption.strip():
        reject = "empty_caption"
    return Row(index=index, key=key, raw_key=raw_key.encode("utf-8", "backslashreplace").decode("utf-8"),
               source=source, caption=caption.strip() if caption_ok else "", reject=reject, spans=spans)
