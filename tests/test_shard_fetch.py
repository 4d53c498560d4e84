"""Fetching from local paths, file://, a real HTTP server on 127.0.0.1, and fsspec filesystems."""

from __future__ import annotations

import pytest
from shard_helpers import VideoServer, make_h264

from data_pipeline.config import FetchConfig
from data_pipeline.fetch import FetchError, fetch


def cfg(**kw) -> FetchConfig:
    base = dict(timeout_s=1.0, total_timeout_s=5.0, retries=2, backoff_s=0.01, max_bytes=1 << 20)
    base.update(kw)
    return FetchConfig(**base)


@pytest.fixture(scope="module")
def video_bytes(tmp_path_factory) -> bytes:
    return make_h264(tmp_path_factory.mktemp("fetch") / "v.mp4").read_bytes()


def reason(source: str, c: FetchConfig) -> str:
    with pytest.raises(FetchError) as e:
        fetch(source, c)
    return e.value.reason


def test_local_and_file_url(tmp_path, video_bytes):
    p = tmp_path / "a b.mp4"
    p.write_bytes(video_bytes)
    assert fetch(str(p), cfg()).path == str(p)
    assert fetch(f"file://{str(p).replace(' ', '%20')}", cfg()).path == str(p)
    assert reason(str(tmp_path / "missing.mp4"), cfg()) == "not_found"
    (tmp_path / "zero.mp4").write_bytes(b"")
    assert reason(str(tmp_path / "zero.mp4"), cfg()) == "empty_file"
    assert reason(str(p), cfg(max_bytes=100)) == "too_large"
    assert reason("ftp://example.com/a.mp4", cfg()) == "scheme_not_allowed"


def test_http_ok_404_500_redirects(video_bytes):
    with VideoServer({"/ok.mp4": video_bytes}) as srv:
        assert fetch(srv.url + "/ok.mp4", cfg()).data == video_bytes
        assert fetch(srv.url + "/redirect-ok", cfg()).data == video_bytes
        assert reason(srv.url + "/missing.mp4", cfg()) == "http_404"
        assert srv.hits["/missing.mp4"] == 1  # 4xx is never retried
        assert reason(srv.url + "/500", cfg(retries=2)) == "http_500"
        assert srv.hits["/500"] == 3  # 1 + 2 retries
        assert fetch(srv.url + "/flaky", cfg(retries=3)).data == video_bytes  # 503, 503, 200
        assert reason(srv.url + "/redirect-file", cfg()) == "redirect_scheme"


def test_http_hanging_server_times_out_with_retries(video_bytes):
    with VideoServer({}) as srv:
        assert reason(srv.url + "/hang", cfg(timeout_s=0.3, retries=1)) == "timeout"
        assert srv.hits["/hang"] == 2
        # the client gave up by itself: both requests are still hanging on the server's side
        assert srv.answered.get("/hang", 0) == 0


def test_http_size_cap_by_header_and_while_streaming():
    with VideoServer({}) as srv:
        assert reason(srv.url + "/big", cfg(max_bytes=1 << 20)) == "too_large"
        assert reason(srv.url + "/big-no-length", cfg(max_bytes=1 << 20)) == "too_large"
        assert srv.hits["/big-no-length"] == 1  # not retried


def test_connection_refused_is_a_reason():
    assert reason("http://127.0.0.1:9/x.mp4", cfg(retries=0)) == "connection_error"


def test_fsspec_memory_filesystem_and_unknown_protocol(video_bytes):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/v.mp4", video_bytes)
    c = cfg(allowed_schemes=["memory", "nosuchfs"])
    assert fetch("memory://bucket/v.mp4", c).data == video_bytes
    assert reason("memory://bucket/missing.mp4", c) == "not_found"
    assert reason("memory://bucket/v.mp4", cfg(allowed_schemes=["memory"], max_bytes=10)) == "too_large"
    assert reason("nosuchfs://bucket/v.mp4", c) == "scheme_unsupported"
