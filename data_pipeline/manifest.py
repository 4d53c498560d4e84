"""Manifest (csv / parquet / jsonl) → an Arrow table of (key, source, caption) → rows of one shard.

Why Arrow and not a list of Python rows: a WebVid-10M manifest is 10M rows, and every worker (and
every SLURM array task) needs random access to its own shards' rows. Columnar binary columns take a
fraction of the memory of Python objects, slicing is free, and nothing is pickled to workers.
Columns are read as raw bytes so that a non-UTF-8 caption becomes a per-row failure, not a crash.
Row order is the file order; shard N is rows N*S .. (N+1)*S-1, so ids are stable across reruns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.config import ColumnsConfig

log = logging.getLogger(__name__)

# Candidates, in order, when a column is not named in the config (ours first, then WebVid-10M's).
KEY_COLUMNS = ("key", "videoid", "video_id", "id")
SOURCE_COLUMNS = ("path", "url", "contentUrl", "video_path", "video_url", "source")
CAPTION_COLUMNS = ("caption", "name", "text", "title")

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_UNSAFE_KEY = re.compile(r"[/\\\x00-\x1f]|\.\.")


class ManifestError(ValueError):
    """The manifest as a whole is unusable (missing file, missing column); names the file."""


@dataclass(frozen=True)
class Row:
    index: int  # 0-based data row number in the manifest (stable id)
    key: str  # sanitised sample key ("" when rejected)
    raw_key: str
    source: str
    caption: str
    reject: str | None = None  # failure reason known before any download (bad key, bad caption, ...)


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


def _read_csv(path: str, cols: ColumnsConfig) -> tuple[pa.Table, tuple[str, str, str]]:
    import pyarrow.csv as pcsv

    names = _csv_header(path)
    picked = (_pick(names, cols.key, KEY_COLUMNS, "key", path), _pick(names, cols.source, SOURCE_COLUMNS, "source", path),
              _pick(names, cols.caption, CAPTION_COLUMNS, "caption", path))
    bad_rows: list[int] = []

    def on_invalid(row) -> str:  # rows with a wrong field count: skipped, but said out loud
        bad_rows.append(row.number)
        return "skip"

    table = pcsv.read_csv(
        path,
        parse_options=pcsv.ParseOptions(delimiter="\t" if ".tsv" in path else ",", newlines_in_values=True,
                                        invalid_row_handler=on_invalid),
        convert_options=pcsv.ConvertOptions(column_types={c: pa.binary() for c in set(picked)},
                                            include_columns=list(dict.fromkeys(picked))),
    )
    if bad_rows:
        log.warning("manifest %s: skipped %d malformed CSV lines (wrong field count), e.g. line %s",
                    path, len(bad_rows), bad_rows[0])
    return table, picked


def _read_parquet(path: str, cols: ColumnsConfig) -> tuple[pa.Table, tuple[str, str, str]]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    picked = (_pick(names, cols.key, KEY_COLUMNS, "key", path), _pick(names, cols.source, SOURCE_COLUMNS, "source", path),
              _pick(names, cols.caption, CAPTION_COLUMNS, "caption", path))
    return pq.read_table(path, columns=list(dict.fromkeys(picked))), picked


def _read_jsonl(path: str, cols: ColumnsConfig) -> tuple[pa.Table, tuple[str, str, str]]:
    """Line by line, so a broken line is one failed row (its position kept), not a failed file."""
    import gzip

    records: list[dict] = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8", errors="surrogateescape"))
                records.append(rec if isinstance(rec, dict) else {})
            except json.JSONDecodeError:
                records.append({})
    names = sorted({k for r in records[:1000] for k in r})
    picked = (_pick(names, cols.key, KEY_COLUMNS, "key", path), _pick(names, cols.source, SOURCE_COLUMNS, "source", path),
              _pick(names, cols.caption, CAPTION_COLUMNS, "caption", path))

    def col(name: str) -> pa.Array:
        out = []
        for r in records:
            v = r.get(name)
            out.append(None if v is None else str(v).encode("utf-8", errors="surrogateescape"))
        return pa.array(out, type=pa.binary())

    return pa.table({n: col(n) for n in dict.fromkeys(picked)}), picked


class Manifest:
    """The manifest as three binary columns plus which rows repeat an earlier key."""

    def __init__(self, path: str, fmt: str = "auto", columns: ColumnsConfig | None = None):
        self.path = str(path)
        if not Path(self.path).exists() and "://" not in self.path:
            raise ManifestError(f"manifest {self.path} does not exist")
        kind = detect_format(self.path, fmt)
        reader = {"csv": _read_csv, "parquet": _read_parquet, "jsonl": _read_jsonl}[kind]
        table, (k, s, c) = reader(self.path, columns or ColumnsConfig())
        self.keys = self._as_binary(table.column(k))
        self.sources = self._as_binary(table.column(s))
        self.captions = self._as_binary(table.column(c))
        self.columns = (k, s, c)
        self.format = kind
        self._duplicate = self._find_duplicates(self.keys)

    @staticmethod
    def _as_binary(col: pa.ChunkedArray) -> pa.Array:
        arr = col.combine_chunks()
        if pa.types.is_binary(arr.type):
            return arr
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            arr = pc.cast(arr, pa.string())
        return pc.cast(arr, pa.binary())

    @staticmethod
    def _find_duplicates(keys: pa.Array) -> pa.Array:
        """Bool per row: True when an earlier row has the same key (vectorised; 10M rows in seconds)."""
        n = len(keys)
        idx = pa.array(range(n), type=pa.int64())
        firsts = pa.table({"k": keys, "i": idx}).group_by("k").aggregate([("i", "min")]).column("i_min")
        return pc.invert(pc.is_in(idx, value_set=firsts))

    def __len__(self) -> int:
        return len(self.keys)

    def num_shards(self, samples_per_shard: int) -> int:
        return (len(self) + samples_per_shard - 1) // samples_per_shard

    def shard_rows(self, shard: int, samples_per_shard: int) -> list[Row]:
        start = shard * samples_per_shard
        end = min(start + samples_per_shard, len(self))
        keys = self.keys.slice(start, end - start).to_pylist()
        sources = self.sources.slice(start, end - start).to_pylist()
        captions = self.captions.slice(start, end - start).to_pylist()
        dups = self._duplicate.slice(start, end - start).to_pylist()
        return [make_row(start + i, keys[i], sources[i], captions[i], dups[i]) for i in range(end - start)]


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


def make_row(index: int, key_b: bytes | None, source_b: bytes | None, caption_b: bytes | None,
             duplicate: bool = False) -> Row:
    raw_key, key_ok = _text(key_b)
    source, source_ok = _text(source_b)
    caption, caption_ok = _text(caption_b)
    if caption_ok:
        try:  # JSON escapes can smuggle lone surrogates into an otherwise valid line
            caption.encode("utf-8")
        except UnicodeEncodeError:
            caption_ok = False
    key, reject = sanitise_key(raw_key) if key_ok else ("", "bad_key")
    if reject is None and duplicate:
        reject = "duplicate_key"
    if reject is None and not source.strip():
        reject = "missing_source"
    if reject is None and not caption_ok:
        reject = "caption_not_utf8"
    if reject is None and not caption.strip():
        reject = "empty_caption"
    return Row(index=index, key=key, raw_key=raw_key.encode("utf-8", "backslashreplace").decode("utf-8"),
               source=source, caption=caption.strip() if caption_ok else "", reject=reject)
