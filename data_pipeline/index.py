"""Read and check a shard directory's `index.json` before training touches a single sample.

Why a separate gate: a run that silently trains on shards made with another text encoder or
another clip geometry wastes days and fails far from the cause (a shape error deep in the model,
or worse, no error at all). The loader refuses such shards up front, naming the field and both
values. The sharding command (data_pipeline.shard) owns *writing* index.json; this module only
reads it, so both sides agree on one format:

    {"version": 1, "shards": [{"name": "shard-000000.tar", "count": N}, ...], "total": N,
     "encoder": {"name": str, "dim": D}, "clip": {"frames": T, "height": H, "width": W, ...},
     "format": "mp4" | "npy", "config_hash": str}

Where the shards are (`data.shards`, docs/loader.md): a directory (local, an fsspec URL such as
`s3://bucket/shards`, or http(s)://) holding index.json; or a *shard list*: brace patterns
(`/data/shard-{000000..000099}.tar`, `https://host/shard-{0000..0099}.tar`), several joined by `::`,
or `pipe:` commands. A list gets its sample counts from an index.json: the one named by
`data.index`, else the one next to its first shard (for a pipe: command, the same command with
the .tar argument replaced by index.json). The list picks, and orders, the index's shards: every
shard of the list must be in that index (matched by file name).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from dataclasses import dataclass, field, replace

from data_pipeline.loader_config import DownloadConfig
from data_pipeline.remote import (
    ShardUnavailable,
    is_http,
    is_local,
    is_pipe,
    local_path,
    open_source,
    shard_name,
    sibling,
)

INDEX_NAME = "index.json"
log = logging.getLogger(__name__)
SUPPORTED_VERSIONS = (1,)


class ShardIndexError(ValueError):
    """index.json missing, malformed, or made with settings other than the run's; the message says which."""


@dataclass(frozen=True)
class ShardEntry:
    name: str
    count: int
    url: str  # full path or URL of the tar file


@dataclass(frozen=True)
class ShardIndex:
    source: str  # the directory (or URL) the index was read from
    shards: tuple[ShardEntry, ...]
    total: int
    encoder_name: str
    encoder_dim: int
    frames: int
    height: int
    width: int
    format: str
    config_hash: str
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    location: str = field(default="", compare=False)  # where index.json was read from (for messages)

    @property
    def counts(self) -> list[int]:
        return [s.count for s in self.shards]

    def fingerprint(self) -> str:
        """Identifies the dataset for resumption: same shards, counts and settings → same sample order."""
        names = ",".join(f"{s.name}:{s.count}" for s in self.shards)
        return f"{self.config_hash}|{self.total}|{len(self.shards)}|{hash_text(names)}"


def hash_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _is_url(path: str) -> bool:
    return "://" in path


def join(directory: str, name: str) -> str:
    if _is_url(directory):
        return posixpath.join(directory.rstrip("/"), name)
    return os.path.join(directory, name)


def is_shard_list(spec: str) -> bool:
    """A brace pattern, a `::`-joined list, a pipe: command or one .tar, rather than a directory."""
    return is_pipe(spec) or "::" in spec or ("{" in spec and "}" in spec) or spec.rstrip("/").endswith(".tar")


def expand_shard_list(spec: str) -> list[str]:
    """The URLs / paths / commands of a shard list, in order (braceexpand, as webdataset does)."""
    from braceexpand import braceexpand

    return [u for part in spec.split("::") if part.strip() for u in braceexpand(part.strip())]


def _exists_all(directory: str, names: list[str]) -> list[str]:
    """Names from `names` that are NOT present in `directory` (one listing for URLs, not N round trips).
    http(s) directories cannot be listed: their shards are checked when they are downloaded."""
    if is_http(directory):
        return []
    if _is_url(directory) and not directory.startswith("file://"):
        import fsspec

        fs, root = fsspec.core.url_to_fs(directory)
        present = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
        return [n for n in names if n not in present]
    local = directory[len("file://"):] if directory.startswith("file://") else directory
    return [n for n in names if not os.path.isfile(os.path.join(local, n))]


def _need(d: dict, key: str, kind: type | tuple, where: str):
    if key not in d:
        raise ShardIndexError(f"{where}: field {key!r} is missing")
    value = d[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ShardIndexError(f"{where}: field {key!r} has {value!r}, expected {getattr(kind, '__name__', kind)}")
    return value


def parse_index(data: dict, source: str, where: str = "") -> ShardIndex:
    """Validate the structure of a loaded index.json (no file-system access)."""
    where = where or join(source, INDEX_NAME)
    if not isinstance(data, dict):
        raise ShardIndexError(f"{where}: top level must be an object")
    version = data.get("version")
    if version not in SUPPORTED_VERSIONS:
        raise ShardIndexError(f"{where}: version {version!r} is not supported (supported: {list(SUPPORTED_VERSIONS)})")
    shards_raw = _need(data, "shards", list, where)
    entries = []
    seen: set[str] = set()
    for i, s in enumerate(shards_raw):
        if not isinstance(s, dict):
            raise ShardIndexError(f"{where}: shards[{i}] must be an object with name and count")
        name = _need(s, "name", str, f"{where} shards[{i}]")
        count = _need(s, "count", int, f"{where} shards[{i}]")
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise ShardIndexError(f"{where}: shards[{i}] name {name!r} must be a plain file name in the directory")
        if count < 0:
            raise ShardIndexError(f"{where}: shards[{i}] ({name}) has a negative count {count}")
        if name in seen:
            raise ShardIndexError(f"{where}: shard {name} is listed twice")
        seen.add(name)
        entries.append(ShardEntry(name=name, count=count, url=join(source, name)))
    total = _need(data, "total", int, where)
    if total != sum(e.count for e in entries):
        raise ShardIndexError(f"{where}: total {total} != sum of shard counts {sum(e.count for e in entries)}")
    encoder = _need(data, "encoder", dict, where)
    clip = _need(data, "clip", dict, where)
    fmt = _need(data, "format", str, where)
    if fmt not in ("mp4", "npy"):
        raise ShardIndexError(f"{where}: format {fmt!r} is not one of ['mp4', 'npy']")
    return ShardIndex(
        source=source,
        shards=tuple(entries),
        total=total,
        encoder_name=_need(encoder, "name", str, f"{where} encoder"),
        encoder_dim=_need(encoder, "dim", int, f"{where} encoder"),
        frames=_need(clip, "frames", int, f"{where} clip"),
        height=_need(clip, "height", int, f"{where} clip"),
        width=_need(clip, "width", int, f"{where} clip"),
        format=fmt,
        config_hash=str(data.get("config_hash", "")),
        raw=data,
        location=where,
    )


def read_index(shards: str | os.PathLike, *, index: str = "", check_files: bool = True,
               download: DownloadConfig | None = None) -> ShardIndex:
    """Load and validate the index of `shards` (a directory or a shard list, see the module doc);
    with check_files, every listed tar that can be checked without downloading it must exist.
    `index` overrides where index.json is read from."""
    spec = os.fspath(shards)
    download = download or DownloadConfig()
    if not spec:
        raise ShardIndexError("no shards configured (set data.shards / data.val_shards)")
    if is_shard_list(spec):
        return _read_list_index(spec, index, check_files, download)
    location = index or join(spec, INDEX_NAME)
    parsed = parse_index(_load_json(location, spec, download), spec, location)
    _warn_incomplete(parsed)
    if check_files:
        missing = _exists_all(spec, [s.name for s in parsed.shards])
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise ShardIndexError(f"{location} lists {len(missing)} shard file(s) missing from {spec}: {shown}")
    return parsed


def _load_json(location: str, shards: str, download: DownloadConfig) -> dict:
    """index.json's content (downloaded with retries when remote); ShardIndexError naming it otherwise."""
    try:
        with open_source(location, download) as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise ShardIndexError(
            f"{location} not found: {shards} is not a finished shard directory "
            "(make shards with `python -m data_pipeline.shard`; it writes index.json last)"
        ) from None
    except ShardUnavailable as e:
        raise ShardIndexError(f"{location}: cannot read the index of {shards}: {e.reason} after {e.attempts} "
                              f"attempt(s) ({e.detail}); set data.index to where index.json is") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ShardIndexError(f"{location}: cannot read ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardIndexError(f"{location}: not valid JSON ({e})") from None


def _warn_incomplete(index: ShardIndex) -> None:
    if index.raw.get("complete") is False:
        log.warning("%s: the sharding run that wrote it had unfinished shards; training on the %d finished ones "
                    "(rerun data_pipeline.shard to complete the dataset)", index.location, len(index.shards))


def _read_list_index(spec: str, index: str, check_files: bool, download: DownloadConfig) -> ShardIndex:
    """A shard list's index: the counts of its shards (matched by file name), in the list's order."""
    urls = expand_shard_list(spec)
    if not urls:
        raise ShardIndexError(f"data.shards {spec!r} expands to no shard")
    names = [shard_name(u) for u in urls]
    unnamed = [u for u, n in zip(urls, names) if not n.endswith(".tar")]
    if unnamed:
        raise ShardIndexError(f"cannot tell which index.json entry {unnamed[0]!r} is: a shard list's entries must "
                              "end in (or, for pipe:, name) a .tar file")
    location = index or sibling(urls[0], INDEX_NAME)
    full = parse_index(_load_json(location, spec, download), spec, location)
    counts = {e.name: e.count for e in full.shards}
    unknown = [n for n in names if n not in counts]
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise ShardIndexError(f"{location} does not list {len(unknown)} shard(s) of data.shards={spec!r}: {shown} "
                              "(point data.index at the index.json that made them)")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ShardIndexError(f"data.shards={spec!r} names {twice[:5]} more than once")
    entries = tuple(ShardEntry(name=n, count=counts[n], url=u) for n, u in zip(names, urls))
    _warn_incomplete(full)
    if check_files:
        missing = [e.url for e in entries if is_local(e.url) and not os.path.isfile(local_path(e.url))]
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise ShardIndexError(f"data.shards={spec!r}: {len(missing)} shard file(s) missing: {shown}")
    return replace(full, shards=entries, total=sum(e.count for e in entries))


def check_matches(index: ShardIndex, *, encoder: str, frames: int, height: int, width: int) -> None:
    """Refuse shards made with other settings than the run's. encoder "" accepts any encoder."""
    where = index.location or join(index.source, INDEX_NAME)
    if encoder and index.encoder_name != encoder:
        raise ShardIndexError(
            f"{where}: encoder mismatch: shards were embedded with encoder {index.encoder_name!r} but the run's "
            f"data.encoder is {encoder!r} (re-shard, or set data.encoder to match / to \"\" to accept any)"
        )
    for name, have, want, cfg_key in (
        ("frames", index.frames, frames, "data.num_frames"),
        ("height", index.height, height, "data.image_size"),
        ("width", index.width, width, "data.image_size"),
    ):
        if have != want:
            raise ShardIndexError(
                f"{where}: clip {name} mismatch: shards have clip.{name}={have} but the run's {cfg_key} is {want}"
            )
