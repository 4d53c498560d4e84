"""Shards from object storage (issue 9 item 5): `data.shards` as brace patterns, http(s) URLs and
pipe: commands, read from a real http.server on 127.0.0.1 in a thread serving real tar shards, with
retries, backoff and timeouts; dead and hanging shards are skipped, logged and counted."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import pytest
import torch
from shard_helpers import VideoServer
from test_loader import cfg, take, write_shards

from data_pipeline.index import ShardIndexError, read_index
from data_pipeline.loader import build_loader
from data_pipeline.loader_config import DownloadConfig
from data_pipeline.plan import shard_permutation
from data_pipeline.remote import backoff_delay, shard_name, sibling

COUNTS = [5, 4, 6, 3]
PATTERN = "shard-{000000..000003}.tar"
FAST = DownloadConfig(attempts=3, backoff_s=0.01, max_backoff_s=0.05, timeout_s=0.5, total_timeout_s=10)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("remote") / "s"
    return d, write_shards(d, COUNTS, fmt="mp4")


def _files(d: Path, prefix: str = "/d") -> dict[str, bytes]:
    return {f"{prefix}/{p.name}": p.read_bytes() for p in d.iterdir()}


def _rows(batches: list[dict]) -> list[tuple]:
    return [(k, b["video"][i].numpy().tobytes(), b["text_emb"][i].numpy().tobytes())
            for b in batches for i, k in enumerate(b["keys"])]


def test_http_pattern_and_url_directory_give_the_disk_samples_and_resume_across(shards):
    d, keys = shards
    kw = dict(batch_size=2, shuffle_buffer=4, num_image_frames=1, download=FAST)
    ref = take(build_loader(cfg(d, **kw)), 12)  # 24 clips over 18 samples: streams cross an epoch
    with VideoServer(_files(d)) as srv:
        for spec in (f"{srv.url}/d/{PATTERN}", f"{srv.url}/d"):
            got = take(build_loader(cfg(spec, **kw, num_workers=2)), 12)  # downloads in real worker processes
            assert _rows(got) == _rows(ref), spec
            assert [b["image_keys"] for b in got] == [b["image_keys"] for b in ref]
        val = build_loader(cfg(f"{srv.url}/d/{PATTERN}", batch_size=4, download=FAST), train=False)
        assert [k for b in val for k in b["keys"]] == keys
        # the same dataset by another road: a state saved reading from disk resumes over HTTP exactly
        first = build_loader(cfg(d, **kw))
        take(first, 5)
        remote = build_loader(cfg(f"{srv.url}/d/{PATTERN}", **kw))
        assert remote.index.fingerprint() == first.index.fingerprint()
        remote.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert _rows(take(remote, 7)) == _rows(ref[5:])
        assert remote.skipped_shards == 0 and remote.skipped_samples == 0


def test_a_shard_answering_500_twice_is_retried_and_read(shards, caplog):
    d, keys = shards
    with VideoServer(_files(d), fail_first={"/d/shard-000001.tar": [500, 500]}) as srv:
        with caplog.at_level(logging.ERROR):
            loader = build_loader(cfg(f"{srv.url}/d/{PATTERN}", batch_size=3, download=FAST), train=False)
            got = [k for b in loader for k in b["keys"]]
        assert got == keys
        assert srv.hits["/d/shard-000001.tar"] == 3 and srv.hits["/d/shard-000000.tar"] == 1
    assert "unavailable" not in caplog.text


def test_dead_and_hanging_shards_are_skipped_logged_and_counted(shards, caplog):
    """shard 1 answers 404 (not retried), shard 2 accepts and never answers (each try ends at
    timeout_s): both are given up with a log line naming the URL and the reason, counted in
    loader.skipped_shards, and every sample of shards 0 and 3 still arrives."""
    d, keys = shards
    good = keys[:5] + keys[15:]
    del_files = _files(d)
    del del_files["/d/shard-000001.tar"]
    with VideoServer(del_files, fail_first={"/d/shard-000002.tar": [0] * 10}) as srv:
        # seed 5: epoch 0 opens with the hanging shard; epoch 1 opens with both dead ones
        c = cfg(f"{srv.url}/d/{PATTERN}", batch_size=1, shuffle_buffer=0, seed=5, download=FAST)
        with caplog.at_level(logging.ERROR):
            loader = build_loader(c)  # one stream: every shard, in the epoch's shard order
            got = [k for b in take(loader, len(good) + 1) for k in b["keys"]]
        assert sorted(got[: len(good)]) == sorted(good)
        # epoch 0 gave up both; epoch 1 tried again those that come before its first live shard
        order = shard_permutation(COUNTS, 5, 1)
        before_live = order[: min(order.index(0), order.index(3))]  # dead shards read before a live one
        assert shard_permutation(COUNTS, 5, 0)[0] == 2 and before_live == [1, 2]
        again = len(before_live)
        assert loader.skipped_shards == 2 + again
        assert loader.skipped_samples == 10 + sum(COUNTS[s] for s in before_live)
        assert loader.state_dict()["positions"]["0"][5] == loader.skipped_shards
        assert srv.hits["/d/shard-000001.tar"] == 1 + (1 in before_live)  # a 404 is never retried
        assert srv.hits["/d/shard-000002.tar"] >= FAST.attempts
    assert f"{srv.url}/d/shard-000001.tar unavailable (http_404 after 1 attempt(s)" in caplog.text
    assert f"{srv.url}/d/shard-000002.tar unavailable (timeout after 3 attempt(s)" in caplog.text


def test_pipe_commands_read_shards_and_a_failing_command_is_skipped(shards, caplog):
    d, keys = shards
    ok = build_loader(cfg(f"pipe:cat {d}/{PATTERN}", batch_size=6, download=FAST), train=False)
    assert ok.index.location == f"pipe:cat {d}/index.json"  # the index comes through the same command
    assert [k for b in ok for k in b["keys"]] == keys
    spec = f"pipe:cat {d}/shard-000000.tar::pipe:cat {d}/no-such-dir/shard-000001.tar::pipe:cat {d}/shard-000003.tar"
    with caplog.at_level(logging.ERROR):
        loader = build_loader(cfg(spec, batch_size=4, download=FAST), train=False, index=str(d / "index.json"))
        got = [k for b in loader for k in b["keys"]]
    assert got == keys[:5] + keys[15:]
    assert "no-such-dir/shard-000001.tar unavailable (exit_1 after 3 attempt(s)" in caplog.text
    assert "No such file" in caplog.text  # the command's stderr says why


def test_shard_list_mistakes_are_clear_errors(shards, tmp_path):
    d, _ = shards
    with pytest.raises(ShardIndexError, match=r"does not list 1 shard\(s\).*shard-000004.tar"):
        read_index(f"{d}/shard-{{000000..000004}}.tar")
    with pytest.raises(ShardIndexError, match=r"1 shard file\(s\) missing: " + re.escape(f"{tmp_path}/shard-000002.tar")):
        read_index(f"{d}/shard-000000.tar::{tmp_path}/shard-000002.tar", index=str(d / "index.json"))
    with pytest.raises(ShardIndexError, match="more than once"):
        read_index(f"{d}/shard-000000.tar::{d}/shard-000000.tar")
    with pytest.raises(ShardIndexError, match="must end in"):
        read_index(f"pipe:cat {d}/shard-000000.ta{{r,x}}")
    index = read_index(f"{d}/shard-000003.tar::{d}/shard-{{000000..000001}}.tar")
    assert [(s.name, s.count) for s in index.shards] == [("shard-000003.tar", 3), ("shard-000000.tar", 5),
                                                         ("shard-000001.tar", 4)]
    assert index.total == 12  # a list picks (and orders) the index's shards
    with VideoServer({}) as srv:
        with pytest.raises(ShardIndexError, match=f"{srv.url}/x/index.json.*http_404 after 1 attempt"):
            read_index(f"{srv.url}/x/{PATTERN}", download=FAST)


def test_backoff_names_and_siblings():
    cfg_ = DownloadConfig(backoff_s=1.0, max_backoff_s=5.0)
    rng = random.Random(0)
    waits = [backoff_delay(a, cfg_, rng) for a in range(1, 6)]
    for a, w in zip(range(1, 6), waits):
        base = min(5.0, 2.0 ** (a - 1))
        assert 0.75 * base <= w < 1.25 * base
    assert shard_name("pipe:curl -s 'http://h/a/shard-000001.tar?sig=1' -o -") == "shard-000001.tar"
    assert shard_name("s3://bucket/p/shard-000002.tar") == "shard-000002.tar" == shard_name("/x/shard-000002.tar")
    assert sibling("https://h/a/b/shard-1.tar?x=1", "index.json") == "https://h/a/b/index.json"
    assert sibling("pipe:aws s3 cp s3://b/p/shard-1.tar -", "index.json") == "pipe:aws s3 cp s3://b/p/index.json -"
    assert torch.tensor(waits).argmax().item() >= 3  # later tries wait longer


def test_a_stream_with_no_reachable_shard_stops_with_an_error_naming_them(shards):
    d, _ = shards
    with VideoServer({"/d/index.json": (d / "index.json").read_bytes()}) as srv:  # every shard 404s
        loader = build_loader(cfg(f"{srv.url}/d/{PATTERN}", batch_size=1, download=FAST))
        with pytest.raises(RuntimeError, match=r"no readable sample in epoch 0 .*shards unavailable: .*shard-0000"):
            take(loader, 1)
        assert sum(srv.hits.get(f"/d/shard-{n:06d}.tar", 0) for n in range(4)) == 4  # each tried once (404)


def test_a_trickling_shard_meets_the_whole_download_deadline(shards, caplog):
    """A server that answers every read (so the per-read timeout never fires) but never finishes:
    each try ends at download.total_timeout_s, and after the tries the shard is skipped."""
    d, keys = shards
    slow = DownloadConfig(attempts=2, backoff_s=0.01, timeout_s=0.5, total_timeout_s=1.0)
    with VideoServer(_files(d), fail_first={"/d/shard-000001.tar": [-1] * 5}) as srv:
        with caplog.at_level(logging.ERROR):
            loader = build_loader(cfg(f"{srv.url}/d/{PATTERN}", batch_size=4, download=slow), train=False)
            got = [k for b in loader for k in b["keys"]]
        assert got == keys[:5] + keys[9:] and srv.hits["/d/shard-000001.tar"] == 2
    assert "shard-000001.tar unavailable (timeout after 2 attempt(s): download longer than " \
           "data.download.total_timeout_s=1)" in caplog.text
