"""The memory-mapped columnar copy of the manifest: same rows as parsing in memory, reused on a
rerun, rebuilt when the manifest changes (even at the same size and mtime) or the copy is damaged,
and whole when several real processes build it at once."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data_pipeline.manifest as manifest_mod
from data_pipeline.config import ColumnsConfig
from data_pipeline.manifest import Manifest


def _csv_bytes(n: int, tail_caption: str = "the last caption") -> bytes:
    lines = [b"videoid,contentUrl,duration,page_dir,name\n"]
    for i in range(n - 1):
        key = b"dup" if i in (3, 7) else str(1000 + i).encode()  # row 7 repeats row 3's key
        cap = b"caf\xe9 au lait" if i == 5 else f'"a caption, number {i}"'.encode()
        lines.append(key + b",/videos/" + str(i).encode() + b".mp4,PT00H00M10S,00" + str(i % 7).encode() + b"," + cap + b"\n")
    lines.append(f"last,/videos/last.mp4,PT00H00M10S,001,{tail_caption}\n".encode())
    return b"".join(lines)


def _digest(m: Manifest, per_shard: int = 7) -> str:
    h = hashlib.sha256()
    for s in range(m.num_shards(per_shard)):
        for r in m.shard_rows(s, per_shard):
            h.update(repr(r).encode())
    return h.hexdigest()


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.is_dir())


@pytest.fixture
def small_batches(monkeypatch):
    """Several record batches even for small test manifests (the 10M-row layout in miniature)."""
    monkeypatch.setattr(manifest_mod, "BATCH_ROWS", 3)
    monkeypatch.setattr(manifest_mod, "CSV_BLOCK_BYTES", 256)


def test_mapped_rows_equal_parsed_rows_for_every_format(tmp_path, small_batches):
    csv_path = tmp_path / "m.csv"
    csv_path.write_bytes(_csv_bytes(40))
    pq.write_table(pa.table({"videoid": list(range(30)) + [3], "contentUrl": [f"/v{i}.mp4" for i in range(31)],
                             "name": [f"caption {i}" for i in range(30)] + [None]}), tmp_path / "m.parquet")
    lines = [json.dumps({"id": f"k{i}", "url": f"/v{i}.mp4", "text": f"caption {i}"}) for i in range(20)]
    lines[4] = "{broken json"
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name in ("m.csv", "m.parquet", "m.jsonl"):
        cache = tmp_path / f"cache_{name}"
        parsed = Manifest(str(tmp_path / name))
        mapped = Manifest(str(tmp_path / name), cache_dir=cache)
        assert len(mapped) == len(parsed) and mapped.columns == parsed.columns
        assert _digest(mapped) == _digest(parsed), name
        assert mapped.keys.num_chunks > 1, name  # really streamed in batches
        rows_file = mapped.cache_path / "rows.arrow"
        maps = Path("/proc/self/maps").read_text()
        assert str(rows_file) in maps, "the columns are memory-mapped, not read into the heap"
    rows = Manifest(str(csv_path), cache_dir=tmp_path / "cache_m.csv").shard_rows(0, 40)
    assert [r.reject for r in rows[:9]] == [None, None, None, None, None, "caption_not_utf8", None, "duplicate_key",
                                            None]
    assert rows[-1].key == "last" and rows[-1].caption == "the last caption"


def test_remap_keeps_the_rows_and_releases_the_old_mapping(tmp_path):
    p = tmp_path / "m.csv"
    p.write_bytes(_csv_bytes(200))
    m = Manifest(str(p), cache_dir=tmp_path / "cache")
    before = _digest(m)
    rows_file = str(m.cache_path / "rows.arrow")

    def mappings() -> int:
        return sum(rows_file in line for line in Path("/proc/self/maps").read_text().splitlines())

    assert mappings() == 1
    for _ in range(5):
        m.remap()
        assert _digest(m) == before
    assert mappings() == 1  # each remap unmapped the previous mapping
    Manifest(str(p)).remap()  # parsed in memory: nothing to remap


def test_rerun_reuses_the_mapped_copy(tmp_path, caplog):
    p = tmp_path / "m.csv"
    p.write_bytes(_csv_bytes(50))
    cache = tmp_path / "cache"
    first = Manifest(str(p), cache_dir=cache)
    rows_file = first.cache_path / "rows.arrow"
    inode, mtime = rows_file.stat().st_ino, rows_file.stat().st_mtime_ns
    caplog.set_level("INFO", logger="data_pipeline.manifest")
    caplog.clear()
    again = Manifest(str(p), cache_dir=cache)
    assert again.cache_path == first.cache_path
    assert (rows_file.stat().st_ino, rows_file.stat().st_mtime_ns) == (inode, mtime)
    assert "rows →" not in caplog.text  # nothing was built
    assert _digest(again) == _digest(first)
    # another column mapping is another copy (the mapping is part of the identity)
    other = Manifest(str(p), columns=ColumnsConfig(caption="page_dir"), cache_dir=cache)
    assert other.cache_path != first.cache_path and other.shard_rows(0, 1)[0].caption == "000"
    assert len(_entries(cache)) == 2


def test_changed_manifest_is_rebuilt_never_reused(tmp_path):
    p = tmp_path / "m.csv"
    p.write_bytes(_csv_bytes(50, tail_caption="a dog runs on a beach"))
    cache = tmp_path / "cache"
    old = Manifest(str(p), cache_dir=cache)
    assert old.shard_rows(0, 50)[-1].caption == "a dog runs on a beach"
    st = p.stat()
    # same size, same mtime, different bytes in the tail: only the content hash can tell
    p.write_bytes(_csv_bytes(50, tail_caption="a cat runs on a beach"))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (p.stat().st_size, p.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    new = Manifest(str(p), cache_dir=cache)
    assert new.cache_path != old.cache_path
    assert new.shard_rows(0, 50)[-1].caption == "a cat runs on a beach"
    assert _entries(cache) == [new.cache_path]  # the stale copy is gone
    # truncated (e.g. a copy cut short): fewer rows, never the old copy
    data = p.read_bytes()
    p.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 1])
    cut = Manifest(str(p), cache_dir=cache)
    assert len(cut) == 49 and cut.cache_path != new.cache_path
    assert _digest(cut) == _digest(Manifest(str(p)))


def test_damaged_copy_is_rebuilt(tmp_path, caplog):
    p = tmp_path / "m.csv"
    p.write_bytes(_csv_bytes(30))
    cache = tmp_path / "cache"
    good = _digest(Manifest(str(p), cache_dir=cache))
    entry = _entries(cache)[0]
    with open(entry / "rows.arrow", "r+b") as f:  # cut the Arrow file in half
        f.truncate(f.seek(0, 2) // 2)
    caplog.set_level("WARNING", logger="data_pipeline.manifest")
    assert _digest(Manifest(str(p), cache_dir=cache)) == good
    assert "unreadable" in caplog.text
    meta = json.loads((entry / "meta.json").read_text())
    meta["rows"] += 1  # a copy that disagrees with its own record
    (entry / "meta.json").write_text(json.dumps(meta))
    caplog.clear()
    assert _digest(Manifest(str(p), cache_dir=cache)) == good
    assert "rebuilding" in caplog.text


def _build_in_child(path: str, cache: str, barrier, no_lock: bool) -> tuple[int, str, str]:
    if no_lock:  # a file system without flock: only the atomic rename protects the copy
        def refuse(*_args):
            raise OSError("flock not supported")
        manifest_mod.fcntl.flock = refuse
    manifest_mod.BATCH_ROWS, manifest_mod.CSV_BLOCK_BYTES = 100, 4096  # a longer build: more overlap
    barrier.wait()
    m = Manifest(path, cache_dir=cache)
    return len(m), _digest(m), str(m.cache_path)


@pytest.mark.parametrize("no_lock", [False, True])
def test_concurrent_builders_leave_one_whole_copy(tmp_path, no_lock):
    p = tmp_path / "m.csv"
    p.write_bytes(_csv_bytes(6000))
    cache = tmp_path / "cache"
    expected = (len(Manifest(str(p))), _digest(Manifest(str(p))))
    ctx = mp.get_context("spawn")
    n = 3
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ctx.Pool(n) as pool:
            results = pool.starmap(_build_in_child, [(str(p), str(cache), barrier, no_lock)] * n)
    assert {(r[0], r[1]) for r in results} == {expected}
    assert len({r[2] for r in results}) == 1
    assert [e.name for e in _entries(cache)] == [Path(results[0][2]).name]  # no temp dirs left behind


BUILD_AND_REPORT_PEAK = """
import json, sys
from data_pipeline.config import ColumnsConfig
from data_pipeline.manifest import open_manifest_cache

_, _, meta, _ = open_manifest_cache(sys.argv[1], "csv", ColumnsConfig(), sys.argv[2])
peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"rows": meta["rows"], "peak_mib": peak_kib / 1024}))
"""


def _write_wide_csv(path: Path, rows: int) -> int:
    """A WebVid-shaped CSV of ~1 KB rows (long captions and paths, short keys): the copy's own memory
    grows with the rows (the keys for the duplicate check), a whole-file read with the bytes."""
    caption = "a slow pan across a field of tall grass under a grey sky, birds in the distance, " * 12
    with open(path, "w") as f:
        f.write("videoid,contentUrl,name\n")
        for start in range(0, rows, 20000):
            f.write("".join(f'k{i:08d},/data/videos/part-{i % 977:04d}/a/long/directory/clip-{i:08d}.mp4,"{caption}{i}"\n'
                            for i in range(start, min(rows, start + 20000))))
    return path.stat().st_size


def _peak_mib_of_a_build(manifest: Path, cache: Path) -> tuple[int, float]:
    from trainer_helpers import PY, REPO, subprocess_env

    r = subprocess.run([PY, "-c", BUILD_AND_REPORT_PEAK, str(manifest), str(cache)], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return out["rows"], out["peak_mib"]


def test_building_the_copy_of_a_large_csv_takes_bounded_memory(tmp_path):
    """The module docstring's promise: the copy is built block by block, so a manifest much larger than
    memory can be copied. A real process builds the copy of a ~250 MB CSV and reports its peak RSS
    (VmHWM); a baseline process, the same code on 1000 rows, gives what the interpreter and imports
    take. The difference must stay under half the file's size (a whole-file read needs more than all
    of it: measured ~+300 MiB then, ~+70 MiB for the block-wise build)."""
    small, big = tmp_path / "small.csv", tmp_path / "big.csv"
    _write_wide_csv(small, 1000)
    size_mib = _write_wide_csv(big, 240_000) / 2**20
    assert size_mib > 200
    rows, base = _peak_mib_of_a_build(small, tmp_path / "cache_small")
    assert rows == 1000
    rows, peak = _peak_mib_of_a_build(big, tmp_path / "cache_big")
    assert rows == 240_000
    big.unlink()
    assert peak - base < size_mib / 2, (f"building the copy of a {size_mib:.0f} MiB CSV peaked at {peak:.0f} MiB, "
                                       f"{peak - base:.0f} MiB above a 1000-row build")
