"""Get a video's bytes from a local path, file://, http(s):// or an fsspec URL (s3://, gs://, ...).

Every way of failing ends as a FetchError with a short, stable reason (the shard stats count by
reason) and a detail for humans. Network patience is bounded three ways: a per-operation socket
timeout, a whole-download deadline (a trickling server cannot hold a worker forever), and a byte
cap enforced while streaming (a lying or missing Content-Length cannot fill memory). Only transient
failures (timeouts, dropped connections, HTTP 5xx/429) are retried, with exponential backoff.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from data_pipeline.config import FetchConfig

CHUNK = 1 << 20


class FetchError(Exception):
    def __init__(self, reason: str, detail: str = "", retryable: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.retryable = reason, detail, retryable


@dataclass
class Fetched:
    """A local file (decoded in place, no copy) or downloaded bytes."""

    path: str | None = None
    data: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else os.path.getsize(self.path)


def scheme_of(source: str) -> str:
    if "://" not in source:
        return "file"
    return source.split("://", 1)[0].lower()


def fetch(source: str, cfg: FetchConfig) -> Fetched:
    scheme = scheme_of(source)
    if scheme not in cfg.allowed_schemes:
        raise FetchError("scheme_not_allowed", f"{scheme}:// is not in fetch.allowed_schemes {cfg.allowed_schemes}")
    if scheme == "file":
        path = urllib.parse.unquote(urllib.parse.urlparse(source).path) if "://" in source else source
        return _fetch_local(path, cfg)
    fetcher = _fetch_http_once if scheme in ("http", "https") else _fetch_fsspec_once
    deadline = time.monotonic() + cfg.total_timeout_s
    attempt = 0
    while True:
        try:
            data = fetcher(source, cfg, deadline)
        except FetchError as e:
            if not e.retryable or attempt >= cfg.retries or time.monotonic() >= deadline:
                raise
            time.sleep(min(cfg.backoff_s * 2**attempt, max(0.0, deadline - time.monotonic())))
            attempt += 1
            continue
        if not data:
            raise FetchError("empty_file", "0 bytes downloaded")
        return Fetched(data=data)


def _fetch_local(path: str, cfg: FetchConfig) -> Fetched:
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FetchError("not_found", f"no such file {path}") from None
    except OSError as e:
        raise FetchError("read_error", str(e)) from None
    if size == 0:
        raise FetchError("empty_file", "0 bytes")
    if size > cfg.max_bytes:
        raise FetchError("too_large", f"{size} bytes > fetch.max_bytes={cfg.max_bytes}")
    if not os.access(path, os.R_OK):
        raise FetchError("read_error", f"{path} is not readable")
    return Fetched(path=path)


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only within http(s), never downgrading https → http or leaving for file:/ftp:."""

    def http_error_302(self, req, fp, code, msg, headers):
        newurl = headers.get("location") or headers.get("uri")
        if newurl:
            old = urllib.parse.urlparse(req.full_url).scheme
            new = urllib.parse.urlparse(urllib.parse.urljoin(req.full_url, newurl)).scheme
            if new != old and not (old == "http" and new == "https"):
                raise FetchError("redirect_scheme", f"redirect from {old}:// to {new}:// refused ({newurl})")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


OPENER = urllib.request.build_opener(_SameSchemeRedirects())


def _read_capped(read, cfg: FetchConfig, deadline: float) -> bytes:
    chunks, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise FetchError("timeout", f"download exceeded fetch.total_timeout_s={cfg.total_timeout_s}")
        chunk = read(CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > cfg.max_bytes:
            raise FetchError("too_large", f"more than fetch.max_bytes={cfg.max_bytes} bytes")
        chunks.append(chunk)


def _fetch_http_once(url: str, cfg: FetchConfig, deadline: float) -> bytes:
    timeout = max(0.001, min(cfg.timeout_s, deadline - time.monotonic()))
    req = urllib.request.Request(url, headers={"User-Agent": "vdm-shard/1"})
    try:
        with OPENER.open(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > cfg.max_bytes:
                raise FetchError("too_large", f"Content-Length {length} > fetch.max_bytes={cfg.max_bytes}")
            return _read_capped(resp.read, cfg, deadline)
    except FetchError:
        raise
    except urllib.error.HTTPError as e:
        retry = e.code >= 500 or e.code == 429
        raise FetchError(f"http_{e.code}", f"{url}: {e.reason}", retryable=retry) from None
    except TimeoutError as e:
        raise FetchError("timeout", f"{url}: no answer within {cfg.timeout_s}s ({e})", retryable=True) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, socket.timeout)):
            raise FetchError("timeout", f"{url}: {e.reason}", retryable=True) from None
        if isinstance(e.reason, FetchError):
            raise e.reason from None
        raise FetchError("connection_error", f"{url}: {e.reason}", retryable=True) from None
    except (ConnectionError, OSError) as e:  # reset mid-body, refused, DNS
        raise FetchError("connection_error", f"{url}: {e}", retryable=True) from None
    except Exception as e:  # http.client oddities (bad status line, incomplete read)
        raise FetchError("connection_error", f"{url}: {type(e).__name__}: {e}", retryable=True) from None


def _fetch_fsspec_once(url: str, cfg: FetchConfig, deadline: float) -> bytes:
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise FetchError("scheme_unsupported", f"{url}: no fsspec filesystem for it ({e})") from None
    try:
        size = fs.size(path)
        if size is not None and size > cfg.max_bytes:
            raise FetchError("too_large", f"{size} bytes > fetch.max_bytes={cfg.max_bytes}")
        with fs.open(path, "rb") as f:
            return _read_capped(f.read, cfg, deadline)
    except FetchError:
        raise
    except FileNotFoundError:
        raise FetchError("not_found", url) from None
    except PermissionError as e:
        raise FetchError("permission_denied", f"{url}: {e}") from None
    except Exception as e:  # backends raise their own types; treat as transient
        raise FetchError("connection_error", f"{url}: {type(e).__name__}: {e}", retryable=True) from None
