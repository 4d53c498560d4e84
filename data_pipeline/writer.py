"""Deterministic, atomic tar shards (+ their JSON stats).

Atomic: a shard is written under a temp name and `os.replace`d when complete, and its stats JSON
(the "done" marker) is replaced only after the tar, so a kill at any moment leaves either a
finished shard or one a rerun will redo — never a half shard that looks finished.
Deterministic: fixed mtime/uid/gid/mode/owner names and member order, so two runs (local workers or
a SLURM array) produce byte-identical tars for the same input.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

TMP_MARK = ".tmp-"


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.tar"


def stats_name(shard: int) -> str:
    return f"shard-{shard:06d}.json"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Append samples ({key}.{ext} members, in call order) to a temp tar; `commit` publishes it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}{TMP_MARK}{os.getpid()}")
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self.count += 1

    def commit(self) -> int:
        """Close, fsync and rename into place; returns the tar's size in bytes."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        size = self.tmp.stat().st_size
        os.replace(self.tmp, self.path)
        return size

    def abort(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False))


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_temp_files(out_dir: str | Path, shard: int | None = None) -> int:
    """Delete leftovers of killed writers (all, or one shard's); returns how many were removed."""
    pattern = f"shard-{shard:06d}.*{TMP_MARK}*" if shard is not None else f"*{TMP_MARK}*"
    n = 0
    for p in Path(out_dir).glob(pattern):
        p.unlink(missing_ok=True)
        n += 1
    return n
