"""Read and check a shard directory's `index.json` before training touches a single sample.

Why a separate gate: a run that silently trains on shards made with another text encoder or
another clip geometry wastes days and fails far from the cause (a shape error deep in the model,
or worse, no error at all). The loader refuses such shards up front, naming the field and both
values. The sharding command (data_pipeline.shard) owns *writing* index.json; this module only
reads it, so both sides agree on one format:

    {"version": 1, "shards": [{"name": "shard-000000.tar", "count": N}, ...], "total": N,
     "encoder": {"name": str, "dim": D}, "clip": {"frames": T, "height": H, "width": W, ...},
     "format": "mp4" | "npy", "config_hash": str}

Shard directories may be local paths or fsspec URLs (`s3://bucket/shards`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from dataclasses import dataclass, field

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


def open_binary(path: str):
    """A readable binary file object for a local path or any fsspec URL."""
    if _is_url(path) and not path.startswith("file://"):
        import fsspec

        return fsspec.open(path, "rb").open()
    return open(path[len("file://"):] if path.startswith("file://") else path, "rb")


def _exists_all(directory: str, names: list[str]) -> list[str]:
    """Names from `names` that are NOT present in `directory` (one listing for URLs, not N round trips)."""
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


def parse_index(data: dict, source: str) -> ShardIndex:
    """Validate the structure of a loaded index.json (no file-system access)."""
    where = join(source, INDEX_NAME)
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
    )


def read_index(directory: str | os.PathLike, *, check_files: bool = True) -> ShardIndex:
    """Load and validate `directory/index.json`; with check_files, every listed tar must exist."""
    directory = os.fspath(directory)
    if not directory:
        raise ShardIndexError("no shard directory configured (set data.shards / data.val_shards)")
    path = join(directory, INDEX_NAME)
    try:
        with open_binary(path) as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise ShardIndexError(
            f"{path} not found: {directory} is not a finished shard directory "
            "(make shards with `python -m data_pipeline.shard`; it writes index.json last)"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardIndexError(f"{path}: not valid JSON ({e})") from None
    index = parse_index(data, directory)
    if data.get("complete") is False:
        log.warning("%s: the sharding run that wrote it had unfinished shards; training on the %d finished ones "
                    "(rerun data_pipeline.shard to complete the dataset)", path, len(index.shards))
    if check_files:
        missing = _exists_all(directory, [s.name for s in index.shards])
        if missing:
            shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise ShardIndexError(f"{path} lists {len(missing)} shard file(s) missing from {directory}: {shown}")
    return index


def check_matches(index: ShardIndex, *, encoder: str, frames: int, height: int, width: int) -> None:
    """Refuse shards made with other settings than the run's. encoder "" accepts any encoder."""
    where = join(index.source, INDEX_NAME)
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
