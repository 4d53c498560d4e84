"""Storage faults of a run told in one line each: which path, which filesystem, what was needed, what is intact.

A full disk (or a quota, or a filesystem remounted read-only) reaches the trainer as whatever the
library that was writing says: `OSError: [Errno 28]` from Python, `unexpected pos 704 vs 598` from
torch.save's zip writer, a `CheckpointException` wrapping either from torch.distributed.checkpoint.
`is_out_of_space` recognises all of them, so every writer of a run (checkpoints, train_log.jsonl,
TensorBoard, samples, export) can stop with a `StorageFault` that says what happened instead.

The exit code of a run stopped by a full disk is EXIT_DISK_FULL (common/exit_codes.py).
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from common.exit_codes import EXIT_DISK_FULL

SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
# what libraries say instead of an errno once they have swallowed it (torch.save's zip writer reports
# a short write as a position mismatch; DCP folds each rank's exception into its text)
SPACE_TEXTS = ("no space left", "disk quota exceeded", "read-only file system", "unexpected pos",
               "file write failed", "[errno 28]", "[errno 122]", "[errno 30]")


class StorageFault(RuntimeError):
    """A run stopped by its storage; the message is the whole report (no traceback needed)."""

    exit_code = 1


class DiskFull(StorageFault):
    """A write failed for lack of space, quota or a writable filesystem (or would have: run.on_low_disk)."""

    exit_code = EXIT_DISK_FULL


class CheckpointDamaged(StorageFault):
    """No checkpoint this command may use: damaged (size or checksum), or refused by run.resume_strict."""


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        for inner in _wrapped(exc):
            yield from _chain(inner)
        exc = exc.__cause__ or exc.__context__


def _wrapped(exc: BaseException) -> list[BaseException]:
    """The per-rank exceptions inside DCP's CheckpointException ({rank: (exception, stack)})."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict):
        return []
    inner = [v[0] if isinstance(v, tuple) and v else v for v in failures.values()]
    return [e for e in inner if isinstance(e, BaseException)]


def describe(exc: BaseException) -> str:
    """One line for an exception: DCP's CheckpointException (whose text is several tracebacks) by the
    exceptions it wraps."""
    inner = _wrapped(exc)
    if inner:
        return "; ".join(f"{type(e).__name__}: {e}".rstrip(": ") for e in inner) + " (torch.distributed.checkpoint)"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def is_out_of_space(exc: BaseException) -> bool:
    """Whether `exc` (or anything it wraps) is a write refused for space, quota or a read-only filesystem."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in SPACE_ERRNOS:
            return True
        if any(t in str(e).lower() for t in SPACE_TEXTS):
            return True
    return False


def text_is_out_of_space(text: str) -> bool:
    """The same judgement on an error already turned into text (a rank's failure marker)."""
    return any(t in text.lower() for t in SPACE_TEXTS)


@dataclass(frozen=True)
class Filesystem:
    mount: str
    device: str
    fstype: str

    def __str__(self) -> str:
        return f"{self.device} ({self.fstype}) mounted on {self.mount}"


def filesystem_of(path: str | Path) -> Filesystem:
    """The mount that holds `path` (the longest mount point above it in /proc/self/mounts)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    best = Filesystem("/", "?", "?")
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best.mount):
            best = Filesystem(mount, parts[0], parts[2])
    return best


def free_bytes(path: str | Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def tree_bytes(path: str | Path) -> int:
    """Bytes of every file under `path` (a checkpoint directory)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def human(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def where(path: str | Path) -> str:
    """`path` on `filesystem`, free bytes: the facts every storage message starts with."""
    try:
        free = human(free_bytes(path))
    except OSError:
        free = "unknown"
    return f"{path} (filesystem {filesystem_of(path)}, {free} free)"


def write_failed(what: str, path: str | Path, exc: BaseException, consequence: str) -> StorageFault:
    """The one-line fault of any writer of a run: what could not be written where, why, and what follows."""
    cls = DiskFull if is_out_of_space(exc) else StorageFault
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
    return cls(f"could not write {what} {where(path)}: {reason}; {consequence}")
