"""data_pipeline.loader on real tar shards (webdataset.TarWriter), real h264 (PyAV) and real workers."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from common.mp4 import encode_mp4
from data_pipeline.decode import BadSample, decode_sample
from data_pipeline.index import ShardIndexError, read_index
from data_pipeline.loader import build_loader
from data_pipeline.loader_config import DataConfig
from data_pipeline.plan import buffer_shuffle_order, train_plan

D = 8  # embedding width of the fixture "encoder"
ENCODER = "fixture-encoder"


# ------------------------------------------------------------------------------------ fixtures


def clip_frames(i: int, t: int, h: int, w: int) -> np.ndarray:
    """Clip i: flat frames whose colour identifies (clip, frame) exactly, plus a moving bar."""
    out = np.empty((t, h, w, 3), dtype=np.uint8)
    for f in range(t):
        out[f] = (20 + (i * 37) % 200, 20 + f * 30, 20 + (i * 11) % 200)
        out[f, :, (f * 3) % w] = 250
    return out


def text_emb(i: int) -> np.ndarray:
    """float16 [L_i, D], L_i varies with i; row 0 column 0 holds i so tests can tie embedding to key."""
    length = 2 + i % 5
    emb = np.full((length, D), 0.01 * (i % 7), dtype=np.float16)
    emb[:, 0] = i
    return emb


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_shards(out: Path, counts: list[int], *, fmt: str = "npy", frames: int = 4, size: int = 16,
                 encoder: str = ENCODER, start: int = 0, extra_samples: dict | None = None) -> list[str]:
    """Shards in the documented format (+ index.json); returns the keys in index order."""
    out.mkdir(parents=True, exist_ok=True)
    keys, entries, i = [], [], start
    for n, count in enumerate(counts):
        name = f"shard-{n:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for _ in range(count):
                key = f"s{i:05d}"
                sample = {"__key__": key, "txt": f"caption {i}", "emb.npy": npy_bytes(text_emb(i)),
                          "json": json.dumps({"source": f"v{i}.mp4", "encoder": encoder})}
                frames_i = clip_frames(i, frames, size, size)
                if fmt == "mp4":
                    sample["mp4"] = encode_mp4(frames_i, fps=8)
                else:
                    sample["frames.npy"] = npy_bytes(frames_i)
                sample.update((extra_samples or {}).get(key, {}))
                sink.write(sample)
                keys.append(key)
                i += 1
        entries.append({"name": name, "count": count})
    index = {"version": 1, "shards": entries, "total": sum(counts), "encoder": {"name": encoder, "dim": D},
             "clip": {"frames": frames, "height": size, "width": size, "fps": 8.0, "stride": None},
             "format": fmt, "config_hash": "test"}
    (out / "index.json").write_text(json.dumps(index))
    return keys


def cfg(shards: Path, **kw) -> DataConfig:
    base = dict(shards=str(shards), batch_size=2, num_workers=0, shuffle_buffer=8, num_frames=4, image_size=16,
                num_image_frames=0, encoder=ENCODER, max_text_len=77, seed=3)
    base.update(kw)
    return DataConfig(**base)


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def key_id(key: str) -> int:
    return int(key[1:])


# ------------------------------------------------------------------------------------ batches


def test_mp4_batch_shapes_dtypes_ranges_and_content(tmp_path):
    write_shards(tmp_path / "s", [5, 4], fmt="mp4")
    loader = build_loader(cfg(tmp_path / "s", batch_size=3), train=True)
    batches = take(loader, 3)
    for b in batches:
        assert set(b) == {"video", "text_emb", "text_mask", "num_video_frames", "keys", "captions", "image_keys",
                          "global_motion"}
        assert b["global_motion"].shape == (3, 4) and torch.isnan(b["global_motion"]).all()  # not stored here
        assert b["video"].shape == (3, 3, 4, 16, 16) and b["video"].dtype == torch.float32
        assert b["video"].min() >= -1.0 and b["video"].max() <= 1.0 and b["video"].std() > 0.1
        assert b["num_video_frames"] == 4
        lens = [text_emb(key_id(k)).shape[0] for k in b["keys"]]
        assert b["text_emb"].shape == (3, max(lens), D) and b["text_emb"].dtype == torch.float32
        assert b["text_mask"].dtype == torch.bool and b["text_mask"].sum(1).tolist() == lens
        assert b["captions"] == [f"caption {key_id(k)}" for k in b["keys"]]
        for row, k in enumerate(b["keys"]):
            i = key_id(k)
            assert b["text_emb"][row, 0, 0].item() == i  # embedding travels with its key
            assert not b["text_emb"][row, lens[row]:].any()  # padding is zeros
            # decoded h264 ≈ the frames that were encoded (lossy, so a tolerance)
            want = torch.from_numpy(clip_frames(i, 4, 16, 16)).permute(3, 0, 1, 2).float() / 127.5 - 1
            assert (b["video"][row] - want).abs().mean() < 0.05


def test_npy_exact_and_text_cut_to_max_len(tmp_path):
    write_shards(tmp_path / "s", [6], fmt="npy")
    b = take(build_loader(cfg(tmp_path / "s", batch_size=6, max_text_len=3, shuffle_buffer=0)), 1)[0]
    assert b["keys"] == [f"s{i:05d}" for i in range(6)]  # one shard, no buffer: tar order
    assert b["text_emb"].shape[1] == 3 and b["text_mask"].sum(1).tolist() == [min(3, 2 + i % 5) for i in range(6)]
    want = torch.from_numpy(np.stack([clip_frames(i, 4, 16, 16) for i in range(6)])).permute(0, 4, 1, 2, 3)
    assert torch.equal(b["video"], want.float() / 127.5 - 1)


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_decode_other_codecs_and_wrong_geometry(tmp_path, codec):
    from common.mp4 import write_video

    write_video(tmp_path / "v.mp4", clip_frames(3, 6, 16, 16), 8, codec=codec)
    raw = {"__key__": "k", "mp4": (tmp_path / "v.mp4").read_bytes(), "emb.npy": npy_bytes(text_emb(3)), "txt": b"\xff"}
    s = decode_sample(raw, frames=4, height=16, width=16, max_text_len=77, text_dim=D)
    assert s.frames.shape == (4, 16, 16, 3) and s.text_emb.dtype == np.float32 and s.caption == "\ufffd"
    assert np.abs(s.frames.astype(int) - clip_frames(3, 4, 16, 16)).mean() < 12
    with pytest.raises(BadSample, match=r"decoded 6 frames, expected 8"):
        decode_sample(raw, frames=8, height=16, width=16, max_text_len=77)
    with pytest.raises(BadSample, match=r"expected \(32, 32, 3\)"):
        decode_sample(raw, frames=4, height=32, width=32, max_text_len=77)
    with pytest.raises(BadSample, match="width 8 != the index's encoder dim 384"):
        decode_sample(raw, frames=4, height=16, width=16, max_text_len=77, text_dim=384)


def test_shards_from_an_fsspec_url(tmp_path):
    """Remote shard directories (s3://, gs://, ...) go through fsspec; memory:// stands in for them here."""
    import fsspec

    keys = write_shards(tmp_path / "s", [3, 2])
    fs = fsspec.filesystem("memory")
    for f in (tmp_path / "s").iterdir():
        fs.pipe(f"/remote/{f.name}", f.read_bytes())
    loader = build_loader(cfg("memory://remote", batch_size=5, shuffle_buffer=0), train=False)
    assert [k for b in loader for k in b["keys"]] == keys
    fs.rm("/remote/shard-000001.tar")
    with pytest.raises(ShardIndexError, match="missing.*shard-000001.tar"):
        build_loader(cfg("memory://remote"))
    (tmp_path / "local").mkdir()
    write_shards(tmp_path / "local", [2])
    assert len(build_loader(cfg(f"file://{tmp_path / 'local'}"), train=False)) == 1


def test_fast_npy_path_matches_np_load_and_refuses_truncation():
    from data_pipeline.decode import load_npy

    arrays = [np.arange(12, dtype=np.float16).reshape(3, 4), np.zeros((0, D), np.float16), np.array(7),
              np.asfortranarray(np.arange(15, dtype=np.float32).reshape(3, 5)), np.arange(6, dtype=">i4"),
              np.zeros((2,), np.complex64), np.random.default_rng(0).integers(0, 255, (2, 4, 4, 3), dtype=np.uint8)]
    for a in arrays:
        got = load_npy(npy_bytes(a), "x")
        assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)
    with pytest.raises(BadSample, match="truncated"):
        load_npy(npy_bytes(arrays[-1])[:-5], "x")


# ------------------------------------------------------------------------------------ splitting


def _epoch_keys(shards: Path, rank: int, batches: int) -> list[str]:
    loader = build_loader(cfg(shards, num_workers=2, batch_size=1, shuffle_buffer=4), rank=rank, world_size=2)
    return [k for b in take(loader, batches) for k in b["keys"]]


@pytest.mark.parametrize("counts", [[5] * 8, [10, 10]], ids=["whole-shards", "sample-ranges"])
def test_two_ranks_two_workers_disjoint_and_complete_per_epoch(tmp_path, counts):
    """8 shards → each of 4 streams reads 2 whole shards; 2 shards < 4 streams → equal sample ranges."""
    keys = write_shards(tmp_path / "s", counts)
    per_rank = len(keys) // 2  # samples (= batches of 1) per rank per epoch; streams get equal shares here
    two_epochs = {r: _epoch_keys(tmp_path / "s", r, 2 * per_rank) for r in (0, 1)}
    epochs = [[k for r in (0, 1) for k in two_epochs[r][e * per_rank:(e + 1) * per_rank]] for e in (0, 1)]
    for e in epochs:
        assert sorted(e) == sorted(keys)  # every sample once per epoch, across ranks and workers
    assert not set(two_epochs[0][:per_rank]) & set(two_epochs[1][:per_rank])
    assert epochs[0] != epochs[1]  # reshuffled per epoch


def _shard_order_per_epoch(shards: Path, seed: int, epochs: int, per_shard: int, n_shards: int) -> list[list[int]]:
    """The order in which one stream (one rank, batch 1, no sample shuffle) reads the shards, per epoch."""
    loader = build_loader(cfg(shards, batch_size=1, shuffle_buffer=1, seed=seed), train=True)
    keys = [b["keys"][0] for b in take(loader, epochs * per_shard * n_shards)]
    shards_read = [key_id(k) // per_shard for k in keys]
    per_epoch = per_shard * n_shards
    return [list(dict.fromkeys(shards_read[e * per_epoch:(e + 1) * per_epoch])) for e in range(epochs)]


def test_shard_order_is_a_new_permutation_each_epoch_and_seed(tmp_path):
    """docs/loader.md, step 1: "each epoch the non-empty shards are permuted with seed + epoch". Read with
    no sample shuffle (shuffle_buffer 1), so the sample shuffle cannot hide a shard order that repeats
    every epoch or ignores the seed (the per-epoch check in the test above passes either way)."""
    from data_pipeline.plan import shard_permutation

    n_shards, per_shard = 6, 2
    write_shards(tmp_path / "s", [per_shard] * n_shards)
    orders = _shard_order_per_epoch(tmp_path / "s", 3, 3, per_shard, n_shards)
    for epoch, order in enumerate(orders):
        assert sorted(order) == list(range(n_shards)), order  # each shard read whole, once per epoch
        assert order == shard_permutation([per_shard] * n_shards, 3, epoch)
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2], orders
    other_seed = _shard_order_per_epoch(tmp_path / "s", 4, 2, per_shard, n_shards)
    assert other_seed[0] != orders[0] and other_seed[1] != orders[1], (other_seed, orders)


def test_plan_buffer_is_a_bounded_local_permutation():
    rng = np.random.default_rng(0)
    order = buffer_shuffle_order(500, 16, rng)
    assert sorted(order.tolist()) == list(range(500)) and order.tolist() != list(range(500))
    assert all(order[p] < p + 16 for p in range(500))  # never needs more than 16 samples held
    a = train_plan([7, 0, 5, 9], seed=1, epoch=2, stream=1, n_streams=2, buffer=4)
    b = train_plan([7, 0, 5, 9], seed=1, epoch=2, stream=1, n_streams=2, buffer=4)
    assert a.segments == b.segments and np.array_equal(a.order, b.order)
    assert all(s.shard != 1 for s in a.segments)  # empty shard never planned


def test_plans_cover_every_sample_exactly_once_per_epoch_for_many_layouts():
    """Pure plan check over random shard counts and stream counts (both split modes, empty shards)."""
    from data_pipeline.plan import val_plan

    rng = np.random.default_rng(0)
    for trial in range(60):
        counts = [int(c) for c in rng.integers(0, 9, size=int(rng.integers(1, 12)))]
        n_streams = int(rng.integers(1, 9))
        if sum(counts) < n_streams:
            continue
        for epoch in (0, 1):
            seen = []
            for stream in range(n_streams):
                plan = train_plan(counts, seed=trial, epoch=epoch, stream=stream, n_streams=n_streams, buffer=4)
                assert sorted(plan.order.tolist()) == list(range(len(plan)))
                seen += [(seg.shard, j) for seg in plan.segments for j in range(seg.start, seg.stop)]
            assert sorted(seen) == [(i, j) for i, c in enumerate(counts) for j in range(c)], (counts, n_streams)
        ranks = [val_plan(counts, rank=r, world_size=n_streams) for r in range(n_streams)]
        flat = [(seg.shard, j) for p in ranks for seg in p.segments for j in range(seg.start, seg.stop)]
        assert flat == [(i, j) for i, c in enumerate(counts) for j in range(c)]  # ordered, complete
        assert max(len(p) for p in ranks) - min(len(p) for p in ranks) <= 1  # balanced


def test_follow_plan_delivers_every_position_once_in_plan_order_even_with_missing_samples(tmp_path):
    from data_pipeline.loader import follow_plan

    write_shards(tmp_path / "s", [6, 6, 6])
    _rewrite_index(tmp_path / "s", shards=[{"name": f"shard-{n:06d}.tar", "count": c} for n, c in
                                          enumerate([6, 9, 6])], total=21)  # shard 1 "loses" 3 samples
    index = read_index(tmp_path / "s")
    plan = train_plan(index.counts, seed=0, epoch=0, stream=0, n_streams=1, buffer=5)
    for start in (0, 7):
        got = list(follow_plan(index, plan, start))
        assert [p for p, _ in got] == list(range(start, 21))
        keys = [raw["__key__"] if raw is not None else None for _, raw in got]
        lost = [p for p in range(start, 21) if _shard_and_sample(plan, p) in {(1, 6), (1, 7), (1, 8)}]
        assert [p for p, raw in got if raw is None] == lost and len(lost) > 0
        assert len({k for k in keys if k}) == len([k for k in keys if k])  # no sample twice


def test_follow_plan_reports_an_unavailable_shard_after_a_short_one(tmp_path):
    """A shard with fewer samples than index.json says must not hide a later unopenable shard from
    the caller's `lost` list (it counts lost shards and names them when an epoch has no sample)."""
    from data_pipeline.loader import follow_plan
    from data_pipeline.plan import Plan, Segment

    write_shards(tmp_path / "s", [6, 6, 6])
    _rewrite_index(tmp_path / "s", shards=[{"name": f"shard-{n:06d}.tar", "count": c} for n, c in
                                          enumerate([6, 9, 6])], total=21)  # shard 1 is short by 3
    index = read_index(tmp_path / "s")
    (tmp_path / "s" / "shard-000002.tar").unlink()  # shard 2 cannot be opened (gone since the index was read)
    plan = Plan(segments=(Segment(1, 0, 9), Segment(2, 0, 6)), order=np.arange(15))
    lost: list[str] = []
    got = list(follow_plan(index, plan, 0, lost=lost))
    assert [p for p, _ in got] == list(range(15))
    assert [p for p, raw in got if raw is None] == list(range(6, 15))
    assert lost == [index.shards[2].url]


def _shard_and_sample(plan, p):
    """(shard, sample index in the shard) delivered at output position p of the plan."""
    r, base = int(plan.order[p]), 0
    for seg in plan.segments:
        if r < base + seg.size:
            return seg.shard, seg.start + r - base
        base += seg.size
    raise AssertionError(p)


# ------------------------------------------------------------------------------------ joint training


def _own_and_other_frames(keys_in_dataset, key):
    own = clip_frames(key_id(key), 4, 16, 16)
    others = [clip_frames(key_id(k), 4, 16, 16) for k in keys_in_dataset if k != key]
    return own, np.concatenate(others)


@pytest.mark.parametrize("batch_size", [3, 1])
def test_joint_image_frames_come_from_other_clips(tmp_path, batch_size):
    """Frame m of a row is a frame of the m-th next clip of the row's stream, named in image_keys."""
    keys = write_shards(tmp_path / "s", [6, 6])
    loader = build_loader(cfg(tmp_path / "s", batch_size=batch_size, num_image_frames=2))
    for b in take(loader, 4):
        assert b["video"].shape == (batch_size, 3, 6, 16, 16) and b["num_video_frames"] == 4
        frames = ((b["video"] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
        for row, key in enumerate(b["keys"]):
            own, others = _own_and_other_frames(keys, key)
            assert np.array_equal(frames[row, :4], own)
            sources = b["image_keys"][row]
            assert len(sources) == 2 and key not in sources and set(sources) <= set(keys)
            for extra, src in zip(frames[row, 4:], sources):
                assert not any(np.array_equal(extra, f) for f in own)
                assert any(np.array_equal(extra, f) for f in clip_frames(key_id(src), 4, 16, 16))


def test_validation_joint_frames_with_single_clip_batches(tmp_path):
    keys = write_shards(tmp_path / "s", [3])
    batches = list(build_loader(cfg(tmp_path / "s", batch_size=1, num_image_frames=2), train=False))
    assert [b["keys"][0] for b in batches] == keys
    for b in batches:  # the last clip borrows from the previous one, the others from the next one
        frames = ((b["video"] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()[0]
        own, others = _own_and_other_frames(keys, b["keys"][0])
        assert all(any(np.array_equal(x, f) for f in others) and not any(np.array_equal(x, f) for f in own)
                   for x in frames[4:])


# ------------------------------------------------------------------------------------ resumption


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["keys"] == y["keys"] and x["captions"] == y["captions"]
        for name in ("video", "text_emb", "text_mask"):
            assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(tmp_path, num_workers):
    """Consume N, save, rebuild, load, next M == the uninterrupted run's (across epoch boundaries)."""
    write_shards(tmp_path / "s", [7, 5, 9], fmt="mp4")
    c = cfg(tmp_path / "s", num_workers=num_workers, batch_size=2, shuffle_buffer=6, num_image_frames=1)
    n, m = 7, 8  # 21 samples: several epochs per stream within n + m batches
    full = take(build_loader(c), n + m)

    first = build_loader(c)
    it = iter(first)
    consumed = [next(it) for _ in range(n)]  # workers have prefetched beyond these
    _same(consumed, full[:n])
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able, small
    assert len(json.dumps(state)) < 2000
    del it

    resumed = build_loader(c)
    resumed.load_state_dict(state)
    _same(take(resumed, m), full[n:])
    assert resumed.epoch >= 1


def test_resume_with_sample_range_split_and_single_clip_batches(tmp_path):
    """Rank 1 of 2 with 2 workers over 3 shards (< 4 streams): sample ranges; B=1 joint frames look ahead."""
    write_shards(tmp_path / "s", [7, 5, 9])
    c = cfg(tmp_path / "s", num_workers=2, batch_size=1, shuffle_buffer=3, num_image_frames=2)
    full = take(build_loader(c, rank=1, world_size=2), 16)
    first = build_loader(c, rank=1, world_size=2)
    _same(take(first, 9), full[:9])
    resumed = build_loader(c, rank=1, world_size=2)
    resumed.load_state_dict(first.state_dict())
    _same(take(resumed, 7), full[9:])


def test_resume_twice_and_keeps_going_without_reload(tmp_path):
    write_shards(tmp_path / "s", [4, 6])
    c = cfg(tmp_path / "s", batch_size=3, shuffle_buffer=5)
    full = take(build_loader(c), 12)
    a = build_loader(c)
    got = take(a, 3)
    b = build_loader(c)
    b.load_state_dict(a.state_dict())
    got += take(b, 4)
    got += take(b, 2)  # a second iter() on the same loader continues where the first stopped
    c2 = build_loader(c)
    c2.load_state_dict(b.state_dict())
    stale = iter(c2)
    got.append(next(stale))
    fresh = iter(c2)  # supersedes `stale`: the old iterator stops instead of moving the position
    got += [next(fresh), next(fresh)]
    assert next(stale, None) is None
    _same(got, full)


def test_resume_skips_consumed_shards_unopened_and_does_not_decode_skipped_samples(tmp_path, monkeypatch):
    import data_pipeline.loader as loader_mod

    write_shards(tmp_path / "s", [5, 5, 5, 5])
    c = cfg(tmp_path / "s", batch_size=1, shuffle_buffer=0)  # one stream, no buffer: shards read in turn
    a = build_loader(c)
    consumed = take(a, 12)  # two whole shards and 2 samples of the third
    opened, decoded = [], []
    real_read, real_decode = loader_mod.read_shard, loader_mod.decode_sample
    monkeypatch.setattr(loader_mod, "read_shard", lambda url: opened.append(Path(url).name) or real_read(url))
    monkeypatch.setattr(loader_mod, "decode_sample", lambda raw, **kw: decoded.append(raw["__key__"]) or
                        real_decode(raw, **kw))
    b = build_loader(c)
    b.load_state_dict(a.state_dict())
    nxt = take(b, 2)
    per_shard = [key_id(k) // 5 for x in consumed for k in x["keys"]]
    done_shards = {f"shard-{n:06d}.tar" for n in set(per_shard) if per_shard.count(n) == 5}
    assert len(done_shards) == 2 and not done_shards & set(opened)  # fully consumed shards never opened
    assert decoded == [k for x in nxt for k in x["keys"]]  # the 2 read-past samples were not decoded


def test_resume_refuses_another_seed_or_buffer_unless_not_strict(tmp_path, caplog):
    write_shards(tmp_path / "s", [6, 6])
    a = build_loader(cfg(tmp_path / "s"))
    take(a, 7)  # into epoch 1 (2 streams of 6 samples, batch 2)
    b = build_loader(cfg(tmp_path / "s", seed=4))
    with pytest.raises(ValueError, match=r"seed was 3 when saved.*data.seed = 4"):
        b.load_state_dict(a.state_dict())
    with caplog.at_level(logging.WARNING):
        b.load_state_dict(a.state_dict(), strict=False)
    assert b.epoch == 1 and "restarting all streams" in caplog.text
    with pytest.raises(ValueError, match="shuffle_buffer was 8 when saved"):
        build_loader(cfg(tmp_path / "s", shuffle_buffer=2)).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="malformed"):
        build_loader(cfg(tmp_path / "s")).load_state_dict({**a.state_dict(), "positions": {"0": ["x", 0, 0, 0]}})
    with pytest.raises(ValueError, match="unsupported version 1"):
        build_loader(cfg(tmp_path / "s")).load_state_dict({"version": 1})


# ------------------------------------------------------------------------------------ refusing bad input


def _rewrite_index(shards_dir: Path, **changes) -> None:
    index = json.loads((shards_dir / "index.json").read_text())
    for path, value in changes.items():
        node = index
        *parents, leaf = path.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (shards_dir / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(("change", "cfg_kw", "pattern"), [
    ({"encoder__name": "bert-large-uncased"}, {}, r"encoder mismatch.*'bert-large-uncased'.*'fixture-encoder'"),
    ({"clip__frames": 8}, {}, r"clip frames mismatch.*frames=8.*num_frames is 4"),
    ({"clip__height": 32}, {}, r"clip height mismatch.*height=32.*image_size is 16"),
    ({"clip__width": 8}, {}, r"clip width mismatch.*width=8.*image_size is 16"),
    ({}, {"num_frames": 5}, r"clip frames mismatch.*frames=4.*num_frames is 5"),
])
def test_mismatched_index_is_refused_naming_the_field(tmp_path, change, cfg_kw, pattern):
    write_shards(tmp_path / "s", [3])
    _rewrite_index(tmp_path / "s", **change)
    with pytest.raises(ShardIndexError, match=pattern):
        build_loader(cfg(tmp_path / "s", **cfg_kw))


def test_any_encoder_accepted_when_config_says_so(tmp_path):
    write_shards(tmp_path / "s", [3], encoder="whatever-bert")
    assert take(build_loader(cfg(tmp_path / "s", encoder="")), 1)[0]["video"].shape[0] == 2


def test_missing_index_and_missing_shard_files_are_clear_errors(tmp_path):
    with pytest.raises(ShardIndexError, match=r"index.json not found"):
        build_loader(cfg(tmp_path / "nothing"))
    write_shards(tmp_path / "s", [3, 3, 3])
    os.remove(tmp_path / "s" / "shard-000001.tar")
    with pytest.raises(ShardIndexError, match=r"1 shard file\(s\) missing.*shard-000001.tar"):
        build_loader(cfg(tmp_path / "s"))
    _rewrite_index(tmp_path / "s", total=5)
    with pytest.raises(ShardIndexError, match="total 5 != sum of shard counts 9"):
        read_index(tmp_path / "s")


def test_too_few_samples_for_the_streams_is_a_clear_error(tmp_path):
    write_shards(tmp_path / "s", [3])
    with pytest.raises(ValueError, match=r"3 samples cannot feed 4 loader streams"):
        build_loader(cfg(tmp_path / "s", num_workers=2), rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size=2\)"):
        build_loader(cfg(tmp_path / "s"), rank=2, world_size=2)


class _Boom:
    """Unpickling this would create a file: proof that loading never runs pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickled_npy_is_refused_and_the_run_goes_on(tmp_path, caplog):
    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    np.save(evil, np.array([_Boom(str(marker))], dtype=object), allow_pickle=True)
    raw = {"__key__": "bad", "frames.npy": evil.getvalue(), "emb.npy": npy_bytes(text_emb(0))}
    with pytest.raises(BadSample, match="pickle"):
        decode_sample(raw, frames=4, height=16, width=16, max_text_len=77)
    import pickle

    for payload, reason in ((pickle.dumps(_Boom(str(marker))), "pickle"), (b"\x93NUMPY garbage", "not a valid .npy")):
        with pytest.raises(BadSample, match=reason):
            decode_sample({**raw, "frames.npy": payload}, frames=4, height=16, width=16, max_text_len=77)
    npz = io.BytesIO()
    np.savez(npz, a=np.zeros(3))
    with pytest.raises(BadSample, match="expected a single .npy array"):
        decode_sample({**raw, "frames.npy": npz.getvalue()}, frames=4, height=16, width=16, max_text_len=77)
    # in a shard: that sample (and a truncated mp4 one) are logged and skipped, the rest is served
    extra = {"s00001": {"frames.npy": evil.getvalue()}, "s00003": {"emb.npy": evil.getvalue()}}
    write_shards(tmp_path / "s", [6], extra_samples=extra)
    with caplog.at_level(logging.ERROR):
        loader = build_loader(cfg(tmp_path / "s", batch_size=1, shuffle_buffer=0))
        keys = [k for b in take(loader, 4) for k in b["keys"]]
    assert keys == ["s00000", "s00002", "s00004", "s00005"] and loader.skipped_samples == 2
    assert "s00001" in caplog.text and "s00003" in caplog.text and "pickle" in caplog.text
    assert not marker.exists()


def test_truncated_video_and_short_shard_are_skipped_with_a_reason(tmp_path, caplog):
    good = encode_mp4(clip_frames(0, 4, 16, 16), fps=8)
    write_shards(tmp_path / "s", [5, 3], fmt="mp4", extra_samples={"s00002": {"mp4": good[: len(good) // 3]}})
    _rewrite_index(tmp_path / "s", shards=[{"name": "shard-000000.tar", "count": 5},
                                          {"name": "shard-000001.tar", "count": 6}], total=11)
    with caplog.at_level(logging.ERROR):
        loader = build_loader(cfg(tmp_path / "s", batch_size=1, shuffle_buffer=0), train=False)
        keys = [k for b in loader for k in b["keys"]]
    assert keys == ["s00000", "s00001", "s00003", "s00004", "s00005", "s00006", "s00007"]
    assert "s00002" in caplog.text and "only 3 readable" in caplog.text


def test_truncated_tar_serves_what_is_readable(tmp_path, caplog):
    write_shards(tmp_path / "s", [6, 6])
    tar = tmp_path / "s" / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with caplog.at_level(logging.ERROR):
        keys = [k for b in build_loader(cfg(tmp_path / "s", batch_size=3), train=False) for k in b["keys"]]
    assert keys[:6] == [f"s{i:05d}" for i in range(6)] and 6 < len(keys) < 12
    assert keys[6:] == [f"s{i:05d}" for i in range(6, len(keys))]
    assert "shard-000001.tar" in caplog.text


# ------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("num_workers", [0, 2])
def test_validation_pass_is_finite_and_ordered(tmp_path, num_workers):
    keys = write_shards(tmp_path / "s", [5, 4, 6])
    seen = []
    for rank in (0, 1):
        loader = build_loader(cfg(tmp_path / "s", batch_size=2, num_workers=num_workers), rank=rank, world_size=2,
                              train=False)
        first = [k for b in loader for k in b["keys"]]
        assert first == [k for b in loader for k in b["keys"]]  # each iter() is the same full pass
        assert len([b for b in loader]) == len(loader)
        seen += first
    assert seen == keys  # rank 0 then rank 1: contiguous ordered halves, nothing twice, nothing left out


# ------------------------------------------------------------------------------------ with the real sharder


def test_loads_what_data_pipeline_shard_writes(tmp_path, synthetic_videos, tiny_bert_dir):
    """Synthetic mp4s → `data_pipeline.shard` (tiny BERT) → this loader: captions, embeddings, pixels agree."""
    import csv

    from common.config import from_dict
    from data_pipeline.config import ShardConfig
    from data_pipeline.shard import run
    from model.text_encoder import TextEncoder

    out = tmp_path / "shards"
    shard_cfg = from_dict(ShardConfig, {
        "manifest": synthetic_videos, "out_dir": str(out), "samples_per_shard": 5, "workers": 1,
        "clip": {"frames": 8, "fps": 8, "height": 32, "width": 32, "too_short": "pad"},
        "encoder": {"name_or_path": tiny_bert_dir, "dtype": "fp32", "batch_size": 8}})
    run(shard_cfg, progress=False)
    index = read_index(out)
    assert index.total == 12 and index.encoder_dim == 32 and len(index.shards) == 3

    with open(synthetic_videos, newline="", encoding="utf-8") as f:
        captions = {row["key"]: row["caption"] for row in csv.DictReader(f)}
    c = cfg(out, batch_size=4, num_frames=8, image_size=32, encoder=index.encoder_name, num_image_frames=2,
            shuffle_buffer=0)
    loader = build_loader(c, train=False)
    batches = list(loader)
    assert [k for b in batches for k in b["keys"]] == sorted(captions)  # every video once, in index order
    encoder = TextEncoder(tiny_bert_dir)
    for b in batches:
        assert b["video"].shape == (4, 3, 10, 32, 32) and b["num_video_frames"] == 8
        assert b["captions"] == [captions[k] for k in b["keys"]]
        want = encoder.encode(b["captions"])
        for row, emb in enumerate(want):
            n = emb.shape[0]
            assert b["text_mask"][row].sum() == n
            assert torch.allclose(b["text_emb"][row, :n], torch.from_numpy(emb.astype(np.float32)), atol=1e-6)
        assert b["video"][:, :, :8].std(dim=2).mean() > 0.01  # moving shapes: frames differ over time
    with pytest.raises(ShardIndexError, match="encoder mismatch"):
        build_loader(cfg(out, num_frames=8, image_size=32, encoder="bert-large-uncased"))


# ------------------------------------------------------------------------------------ elastic determinism


def _global_steps(shards: Path, steps: int, *, world: int, batch_size: int, accum: int = 1, workers: int = 0,
                  states=None, **kw) -> tuple[list[list[tuple]], list]:
    """Per global step, the sorted rows (key, image keys, pixels, text embedding) of every rank's
    micro-batches, and the loaders (rank order) afterwards. `states` is loaded into each loader first."""
    c = cfg(shards, batch_size=batch_size, num_workers=workers, **kw)
    loaders = [build_loader(c, rank=r, world_size=world, grad_accum=accum) for r in range(world)]
    if states is not None:
        for loader in loaders:
            loader.load_state_dict(states)
    its = [iter(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        rows = []
        for it in its:
            for _ in range(accum):
                b = next(it)
                for i, key in enumerate(b["keys"]):
                    n = int(b["text_mask"][i].sum())
                    rows.append((key, tuple(b["image_keys"][i]), b["video"][i].numpy().tobytes(),
                                 b["text_emb"][i, :n].numpy().tobytes()))
        out.append(sorted(rows))
    return out, loaders


ELASTIC = dict(shuffle_buffer=3, num_image_frames=1)


def test_global_sample_sequence_is_the_same_for_any_ranks_workers_and_accumulation(tmp_path):
    """Global batch 4 as 1x4, 1x4 with 2 workers, 2 ranks x 2 (2 workers each), 4 ranks x 1, 2 ranks x 1 x
    accum 2 and 1 x 2 x accum 2: the same clips, image-frame sources, pixels and captions in every step,
    across epoch boundaries (24 samples, 4 streams of 3-9 samples, 10 steps)."""
    write_shards(tmp_path / "s", [7, 5, 9, 3])
    ref, _ = _global_steps(tmp_path / "s", 10, world=1, batch_size=4, **ELASTIC)
    assert len({tuple(r[0] for r in step) for step in ref}) > 5  # the steps differ from each other
    seen = [r[0] for step in ref for r in step]
    assert len(set(seen)) == 24  # every sample comes up within the first epochs of the streams
    for layout in [dict(world=1, batch_size=4, workers=2), dict(world=2, batch_size=2, workers=2),
                   dict(world=4, batch_size=1), dict(world=2, batch_size=1, accum=2),
                   dict(world=1, batch_size=2, accum=2)]:
        got, _ = _global_steps(tmp_path / "s", 10, **layout, **ELASTIC)
        assert got == ref, layout
    other_seed, _ = _global_steps(tmp_path / "s", 10, world=1, batch_size=4, **{**ELASTIC, "seed": 4})
    assert other_seed != ref  # the order is the seed's, not fixed by the layout


def test_resume_on_another_world_size_continues_at_the_next_global_sample(tmp_path):
    """2 ranks consume 3 steps; 1 rank (twice the batch) and 4 ranks (2 workers each) given both saved
    states go on exactly as the uninterrupted run; one rank's state alone is not enough."""
    write_shards(tmp_path / "s", [7, 5, 9, 3])
    ref, _ = _global_steps(tmp_path / "s", 8, world=1, batch_size=4, **ELASTIC)
    first, loaders = _global_steps(tmp_path / "s", 3, world=2, batch_size=2, **ELASTIC)
    assert first == ref[:3]
    states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
    assert {s["samples"] for s in states} == {12}
    on_one, _ = _global_steps(tmp_path / "s", 5, world=1, batch_size=4, states=states, **ELASTIC)
    assert on_one == ref[3:]
    on_four, _ = _global_steps(tmp_path / "s", 5, world=4, batch_size=1, workers=2, states=states, **ELASTIC)
    assert on_four == ref[3:]
    with pytest.raises(ValueError, match="pass the list of every rank's saved states"):
        build_loader(cfg(tmp_path / "s", batch_size=4, **ELASTIC)).load_state_dict(states[1])


def test_changed_global_batch_size_warns_naming_both_and_keeps_the_sample_position(tmp_path, caplog):
    """With data.streams fixed (8, a multiple of 4 and 8) global batch 4 → 8 continues at global sample 16
    of the same sequence: the next step is steps 4 and 5 of the old size together. With the default
    data.streams (= the global batch) the streams change: an approximate restart, also with a warning."""
    write_shards(tmp_path / "s", [7, 5, 9, 3, 6, 4, 5, 8])
    ref, _ = _global_steps(tmp_path / "s", 8, world=1, batch_size=4, streams=8, **ELASTIC)
    _, loaders = _global_steps(tmp_path / "s", 4, world=2, batch_size=2, streams=8, **ELASTIC)
    states = [loader.state_dict() for loader in loaders]
    with caplog.at_level(logging.WARNING):
        bigger, _ = _global_steps(tmp_path / "s", 2, world=1, batch_size=8, streams=8, states=states, **ELASTIC)
    assert "global batch size 4 → 8; continuing at global sample 16" in caplog.text
    assert bigger == [sorted(ref[4] + ref[5]), sorted(ref[6] + ref[7])]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        smaller, _ = _global_steps(tmp_path / "s", 2, world=1, batch_size=2, states=states, **ELASTIC)
    assert "global batch size 4 → 2 (data.streams 8 → 2)" in caplog.text and "approximate" in caplog.text
    assert all(len(step) == 2 for step in smaller)


# ------------------------------------------------------------------------------------ data.min_motion


def _motion_shards(path: Path, counts=(7, 5, 9, 3)) -> tuple[set[str], list[str]]:
    """Shards whose {key}.json carries a motion score: every third clip static (0.0), the rest 0.05.
    Static s00003 also has an unreadable video: skipping by motion must never decode it."""
    n = sum(counts)
    static = {f"s{i:05d}" for i in range(n) if i % 3 == 0}
    extra = {f"s{i:05d}": {"json": json.dumps({"motion": 0.0 if i % 3 == 0 else 0.05, "encoder": ENCODER})}
             for i in range(n)}
    extra["s00003"]["frames.npy"] = b"not a video"
    keys = write_shards(path, list(counts), extra_samples=extra)
    return static, keys


def test_min_motion_skips_static_clips_by_their_json_and_counts_them(tmp_path, caplog):
    static, keys = _motion_shards(tmp_path / "s")
    moving = [k for k in keys if k not in static]
    # one stream (batch 1, one rank), no shuffle buffer: one epoch of moving clips is 16 batches
    with caplog.at_level(logging.ERROR):
        loader = build_loader(cfg(tmp_path / "s", batch_size=1, shuffle_buffer=0, min_motion=0.01))
        got = [k for b in take(loader, len(moving)) for k in b["keys"]]
    assert sorted(got) == sorted(moving)  # every moving clip once, no static one
    assert caplog.text == ""  # the unreadable static clip was never decoded
    plan = train_plan([7, 5, 9, 3], seed=3, epoch=0, stream=0, n_streams=1, buffer=0)
    starts = np.cumsum([0, 7, 5, 9])
    in_order = [keys[starts[s.shard] + j] for s in plan.segments for j in range(s.start, s.stop)]
    passed = in_order[: in_order.index(got[-1])]  # static clips read past before the epoch's last moving one
    assert loader.filtered_samples == sum(k in static for k in passed) > 0
    assert loader.skipped_samples == 0  # filtered clips are not bad samples
    assert loader.state_dict()["positions"]["0"][4] == loader.filtered_samples
    # off (the default): the static clips come back, and the unreadable one is a logged bad sample
    with caplog.at_level(logging.ERROR):
        off = build_loader(cfg(tmp_path / "s", batch_size=1, shuffle_buffer=0))
        got_off = [k for b in take(off, len(keys) - 1) for k in b["keys"]]
    assert set(got_off) == set(keys) - {"s00003"} and off.skipped_samples == 1 and "s00003" in caplog.text


def test_min_motion_keeps_elastic_order_and_exact_resume(tmp_path):
    """The skip depends only on the sample, so every layout skips the same clips: 1 rank x 4, 2 ranks
    x 2 with 2 workers each, and a resume on 1 rank from 2 ranks' states, give the same global steps."""
    static, _ = _motion_shards(tmp_path / "s")
    kw = dict(ELASTIC, min_motion=0.01)
    ref, _ = _global_steps(tmp_path / "s", 8, world=1, batch_size=4, **kw)
    assert not {r[0] for step in ref for r in step} & static
    two, loaders = _global_steps(tmp_path / "s", 3, world=2, batch_size=2, workers=2, **kw)
    assert two == ref[:3]
    states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
    assert sum(loader.filtered_samples for loader in loaders) > 0
    resumed, after = _global_steps(tmp_path / "s", 5, world=1, batch_size=4, states=states, **kw)
    assert resumed == ref[3:]
    assert after[0].filtered_samples >= sum(loader.filtered_samples for loader in loaders)
