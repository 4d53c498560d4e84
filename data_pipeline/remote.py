"""Shard bytes from wherever they live: a local path, http(s)://, an fsspec URL (s3://, gs://,
memory://) or a `pipe:` command (webdataset's convention: the command's stdout is the tar).

Why whole-shard downloads with retries: training clusters often have no shared file system, and
object stores and HTTP servers fail in ordinary ways (5xx under load, dropped connections, a
request that never gets an answer). A shard is downloaded whole before a sample is read, so a try
that fails half-way is simply retried: no sample is delivered twice and none half. Each try is
bounded (a per-request / socket-read timeout and a whole-download deadline), tries are spaced by
exponential backoff with jitter (a thousand ranks retrying in lockstep would hammer the server
again), and after the last try the shard is given up with a ShardUnavailable naming the URL and
the reason: the loader logs it, counts it and goes on with the rest of the data.
"""

from __future__ import annotations

import os
import random
import shlex
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import IO

from data_pipeline.fetch import OPENER, FetchError
from data_pipeline.loader_config import DownloadConfig

CHUNK = 1 << 20
PIPE = "pipe:"


class ShardUnavailable(OSError):
    """A shard (or index) that could not be read after every try; reason is short and stable."""

    def __init__(self, url: str, reason: str, detail: str = "", attempts: int = 1):
        super().__init__(f"{url}: {reason} after {attempts} attempt(s)" + (f" ({detail})" if detail else ""))
        self.url, self.reason, self.detail, self.attempts = url, reason, detail, attempts


class _TryFailed(Exception):
    """One failed try; `retry` says whether another try can help (a 404 will not)."""

    def __init__(self, reason: str, detail: str, retry: bool):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.retry = reason, detail, retry


def is_pipe(url: str) -> bool:
    return url.startswith(PIPE)


def is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def is_local(url: str) -> bool:
    """A path on this machine (plain or file://): opened in place, never downloaded or retried."""
    return not is_pipe(url) and ("://" not in url or url.startswith("file://"))


def local_path(url: str) -> str:
    return urllib.parse.unquote(url[len("file://"):]) if url.startswith("file://") else url


def backoff_delay(attempt: int, cfg: DownloadConfig, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed try number `attempt` (1-based): backoff_s * 2**(attempt-1),
    capped at max_backoff_s, times a jitter in [0.75, 1.25) so many ranks do not retry in step."""
    base = min(cfg.max_backoff_s, cfg.backoff_s * 2 ** (attempt - 1))
    return base * (0.75 + 0.5 * (rng or random).random())


def open_source(url: str, cfg: DownloadConfig) -> IO[bytes]:
    """A readable binary file for `url`, positioned at 0; the caller closes it.

    Local files: opened in place (FileNotFoundError as usual). Anything else: downloaded whole with
    up to cfg.attempts tries; ShardUnavailable when all failed (or the first failure is permanent).
    """
    if is_local(url):
        return open(local_path(url), "rb")
    attempt = 0
    while True:
        attempt += 1
        sink = tempfile.SpooledTemporaryFile(max_size=cfg.spool_mb << 20)
        try:
            _download_once(url, sink, cfg)
            sink.seek(0)
            return sink
        except _TryFailed as e:
            sink.close()
            if not e.retry or attempt >= cfg.attempts:
                raise ShardUnavailable(url, e.reason, e.detail, attempt) from None
            time.sleep(backoff_delay(attempt, cfg))
        except BaseException:
            sink.close()
            raise


def _download_once(url: str, sink: IO[bytes], cfg: DownloadConfig) -> None:
    if is_pipe(url):
        _pipe_once(url[len(PIPE):], sink, cfg)
    elif is_http(url):
        _http_once(url, sink, cfg)
    else:
        _fsspec_once(url, sink, cfg)


def _copy(read, sink: IO[bytes], deadline: float, cfg: DownloadConfig) -> int:
    total = 0
    while True:
        if time.monotonic() > deadline:
            raise _TryFailed("timeout", f"download longer than data.download.total_timeout_s={cfg.total_timeout_s:g}",
                             retry=True)
        chunk = read(CHUNK)
        if not chunk:
            return total
        sink.write(chunk)
        total += len(chunk)


def _http_once(url: str, sink: IO[bytes], cfg: DownloadConfig) -> None:
    """One GET; 5xx, 408, 429, timeouts and dropped connections may be retried, other 4xx not."""
    deadline = time.monotonic() + cfg.total_timeout_s
    req = urllib.request.Request(url, headers={"User-Agent": "vdm-loader/1"})
    try:
        with OPENER.open(req, timeout=cfg.timeout_s) as resp:
            # read1: whatever arrived (one socket read), so a trickle meets the deadline check between
            # reads; read(n) would keep collecting until it had n bytes
            _copy(resp.read1, sink, deadline, cfg)
    except _TryFailed:
        raise
    except FetchError as e:  # a redirect to another scheme (file://, ftp://): refused, and final
        raise _TryFailed(e.reason, e.detail, retry=False) from None
    except urllib.error.HTTPError as e:
        raise _TryFailed(f"http_{e.code}", str(e.reason), retry=e.code >= 500 or e.code in (408, 429)) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            raise _TryFailed("timeout", f"no answer within data.download.timeout_s={cfg.timeout_s:g}", True) from None
        if isinstance(e.reason, FetchError):
            raise _TryFailed(e.reason.reason, e.reason.detail, retry=False) from None
        raise _TryFailed("connection_error", str(e.reason), retry=True) from None
    except TimeoutError:
        raise _TryFailed("timeout", f"no answer within data.download.timeout_s={cfg.timeout_s:g}", True) from None
    except Exception as e:  # reset mid-body, incomplete read, bad status line, redirect refused
        raise _TryFailed("connection_error", f"{type(e).__name__}: {e}", retry=True) from None


def _fsspec_once(url: str, sink: IO[bytes], cfg: DownloadConfig) -> None:
    """s3://, gs://, memory://, ...: whatever fsspec backend is installed; a missing object is final."""
    deadline = time.monotonic() + cfg.total_timeout_s
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise _TryFailed("scheme_unsupported", f"no fsspec filesystem for it ({e})", retry=False) from None
    try:
        with fs.open(path, "rb") as f:
            _copy(f.read, sink, deadline, cfg)
    except _TryFailed:
        raise
    except FileNotFoundError:
        raise _TryFailed("not_found", "no such object", retry=False) from None
    except PermissionError as e:
        raise _TryFailed("permission_denied", str(e), retry=False) from None
    except Exception as e:  # backends raise their own types; treat as transient
        raise _TryFailed("connection_error", f"{type(e).__name__}: {e}", retry=True) from None


def _pipe_once(command: str, sink: IO[bytes], cfg: DownloadConfig) -> None:
    """Run `command` in a shell, its stdout is the file; a non-zero exit or a run longer than
    total_timeout_s fails the try (the whole process group is killed, so no curl lingers)."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(command, shell=True, stdout=out, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=cfg.total_timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise _TryFailed("timeout", f"command ran longer than data.download.total_timeout_s="
                             f"{cfg.total_timeout_s:g}", retry=True) from None
        if proc.returncode != 0:
            tail = err.decode("utf-8", "replace").strip()[-300:]
            raise _TryFailed(f"exit_{proc.returncode}", tail or "no stderr", retry=True)
        out.seek(0)
        _copy(out.read, sink, time.monotonic() + cfg.total_timeout_s, cfg)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.communicate()


def shard_name(url: str) -> str:
    """The file name a shard has in index.json: the URL's or path's last part; for a pipe: command,
    that of its last argument ending in .tar (`pipe:curl -s http://h/shard-000001.tar` →
    shard-000001.tar). "" when there is none."""
    if is_pipe(url):
        try:
            args = shlex.split(url[len(PIPE):])
        except ValueError:
            return ""
        tars = [a for a in args if urllib.parse.urlparse(a).path.endswith(".tar")]
        return shard_name(tars[-1]) if tars else ""
    path = urllib.parse.urlparse(url).path if "://" in url else url
    return path.rstrip("/").rsplit("/", 1)[-1]


def sibling(url: str, name: str) -> str:
    """`name` in the same directory as `url`; for a pipe: command, the same command with its .tar
    argument replaced by that sibling (`pipe:curl -s http://h/a/s-1.tar` → `pipe:curl -s http://h/a/index.json`)."""
    if is_pipe(url):
        args = shlex.split(url[len(PIPE):])
        i = max(i for i, a in enumerate(args) if urllib.parse.urlparse(a).path.endswith(".tar"))
        args[i] = sibling(args[i], name)
        return PIPE + shlex.join(args)
    if "://" in url:
        parts = urllib.parse.urlparse(url)
        return urllib.parse.urlunparse(parts._replace(path=parts.path.rsplit("/", 1)[0] + "/" + name, query="",
                                                      fragment=""))
    return os.path.join(os.path.dirname(url), name)
