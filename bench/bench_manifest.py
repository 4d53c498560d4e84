"""The manifest at the mission's scale: a WebVid-10M-shaped manifest, loaded and sharded.

    python -m bench.bench_manifest --rows 10000000 --workers 1 2 4 [--dir /tmp/bench_manifest]

1. Writes (once; reused while its parameters match) a deterministic WebVid-shaped CSV: columns
   videoid, contentUrl, duration, page_dir, name; captions of 6-15 words; contentUrl is a local
   path that does not exist, so every row fails fast (`not_found`) and the run measures the
   pipeline's own per-row cost, not decoding.
2. Load: the old in-memory parse (`Manifest(path)`) and the mapped copy (`Manifest(path,
   cache_dir=...)`) cold (build) and warm (map), each in a fresh process: wall time and peak RSS.
3. For each worker count: a real `python -m data_pipeline.shard` run (fresh output dir, so the
   parent parses the manifest into the mapped copy first), sampling every process of its tree
   every 0.25 s: VmRSS and, from smaps_rollup, Pss (shared pages divided among the processes that
   map them: the honest sum). Reports per-process peaks, the peak of the per-sample sums, the sum of
   the per-process VmHWM (an upper bound), start → first finished shard, and the total time.
4. The index merge over the run's shards (10,000 for 10M rows), in a fresh process, next to a
   full parse of every shard JSON (what the merge used to do, twice).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VERSION = 2
WORDS = ("a man woman child dog cat bird horse car city street beach ocean forest mountain river sky sunset "
         "sunrise night day aerial view slow motion close up shot of the in on at with and over under near "
         "walking running flying driving swimming sitting standing smiling looking talking playing dancing "
         "red blue green yellow white black old young small big beautiful happy busy quiet empty snowy rainy "
         "sunny cloudy modern ancient wooden glass water fire smoke light shadow people crowd building bridge "
         "road field flowers trees grass sand waves boat train plane kitchen office table window door").split()


def write_manifest(path: Path, rows: int, seed: int = 0) -> Path:
    """Deterministic for (rows, seed); rewritten only when its recorded parameters differ."""
    params = {"version": VERSION, "rows": rows, "seed": seed}
    side = path.with_suffix(".params.json")
    if path.exists() and side.exists() and json.loads(side.read_text()) == params:
        return path
    vocab = np.array(WORDS, dtype=object)
    chunk = 100_000
    t0 = time.perf_counter()
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("videoid,contentUrl,duration,page_dir,name\n")
        for c0 in range(0, rows, chunk):
            rng = np.random.default_rng([seed, c0 // chunk])
            n = min(chunk, rows - c0)
            lengths = rng.integers(6, 16, size=n)
            words = vocab[rng.integers(0, len(vocab), size=int(lengths.sum()))]
            ends = np.cumsum(lengths)
            secs = rng.integers(5, 60, size=n)
            lines = []
            for i in range(n):
                vid = 1_000_000 + (c0 + i) * 7
                page = (c0 + i) // 50 * 50 + 1
                cap_words = words[ends[i] - lengths[i]:ends[i]]
                caption = " ".join(cap_words)
                slug = "-".join(cap_words[:8])  # WebVid's URLs carry the caption's words too
                lines.append(f"{vid},/nonexistent/shutterstock/videos/{vid}/preview/stock-footage-{slug}.mp4,"
                             f"PT00H00M{secs[i]:02d}S,{page:06d}_{page + 49:06d},{caption}\n")
            f.write("".join(lines))
    side.write_text(json.dumps(params))
    print(f"wrote {path} ({rows} rows, {path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    return path


def _run_child(code: str, root: Path = ROOT) -> dict:
    """Run `code` in a fresh interpreter (imports from `root`); it prints one JSON line; VmHWM is added."""
    wrapped = code + textwrap.dedent("""
        import json as _j, sys as _s
        _hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
        _s.stdout.write(_j.dumps({**RESULT, 'peak_rss_mb': int(_hwm) / 1024}) + '\\n')
    """)
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", wrapped], cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_load(manifest: Path, cache: Path, in_memory: bool, baseline: Path | None) -> dict:
    res = {}
    code = textwrap.dedent(f"""
        import time
        from data_pipeline.manifest import Manifest
        t = time.perf_counter(); m = Manifest({str(manifest)!r}); RESULT = {{'seconds': time.perf_counter() - t,
        'rows': len(m)}}
    """)
    if in_memory:
        res["in_memory"] = _run_child(code)
    if baseline:  # the same in-memory parse by an earlier checkout (e.g. before the mapped copy)
        res["in_memory_baseline"] = _run_child(code, baseline) | {"root": str(baseline)}
    shutil.rmtree(cache, ignore_errors=True)
    code = textwrap.dedent(f"""
        import time
        from data_pipeline.manifest import Manifest
        t = time.perf_counter(); m = Manifest({str(manifest)!r}, cache_dir={str(cache)!r})
        RESULT = {{'seconds': time.perf_counter() - t, 'rows': len(m)}}
        t = time.perf_counter(); rows = m.shard_rows(len(m) // 1000 - 1, 1000)
        RESULT['shard_rows_ms'] = (time.perf_counter() - t) * 1000
    """)
    res["mapped_cold"] = _run_child(code)
    res["mapped_warm"] = _run_child(code)
    res["mapped_bytes"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    return res


# ---------------------------------------------------------------------------- process-tree sampling
def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree(root: int) -> list[int]:
    kids, out, todo = _children_map(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _mem(pid: int) -> dict | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, IndexError, ValueError):
        cpu = 0.0
    fields = {ln.split(":")[0]: ln.split()[1] for ln in status.splitlines() if ln.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile"))}
    pss = next((int(ln.split()[1]) for ln in rollup.splitlines() if ln.startswith("Pss:")), 0)
    if "VmRSS" not in fields:
        return None
    role = ("resource_tracker" if "resource_tracker" in cmd else
            "worker" if "multiprocessing" in cmd or "spawn_main" in cmd else "other")
    # RssAnon: the process's own memory; RssFile: mapped file pages (the manifest copy, libraries):
    # clean page cache the kernel can drop and re-read, shared by every process that maps the file
    return {"rss": int(fields["VmRSS"]) / 1024, "hwm": int(fields.get("VmHWM", 0)) / 1024, "pss": pss / 1024,
            "anon": int(fields.get("RssAnon", 0)) / 1024, "file": int(fields.get("RssFile", 0)) / 1024,
            "cpu": cpu, "role": role}


def bench_run(manifest: Path, out: Path, encoder: str, workers: int, per_shard: int, max_s: float = 0) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "data_pipeline.shard", "--manifest", str(manifest), "--out", str(out / "shards"),
           "--encoder", encoder, "--workers", str(workers), "--samples-per-shard", str(per_shard),
           "--max-failure-ratio", "1.0", "--no-progress", "--set", "clip.frames=8", "--set", "clip.height=16",
           "--set", "clip.width=16"]
    t0 = time.monotonic()
    with open(out / "stdout.txt", "w") as so, open(out / "stderr.txt", "w") as se:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=so, stderr=se)
        peaks: dict[int, dict] = {}
        peak_rss_sum = peak_pss_sum = peak_anon_sum = 0.0
        first_shard = None
        shards_dir = out / "shards"
        killed = False
        while proc.poll() is None:
            if max_s and time.monotonic() - t0 > max_s:  # workers die with their parent (PDEATHSIG)
                proc.kill()
                proc.wait()
                killed = True
                break
            rss_sum = pss_sum = anon_sum = 0.0
            for pid in _tree(proc.pid):
                m = _mem(pid)
                if m is None:
                    continue
                if pid == proc.pid:
                    m["role"] = "parent"
                rss_sum += m["rss"]
                pss_sum += m["pss"]
                anon_sum += m["anon"]
                p = peaks.setdefault(pid, {"role": m["role"], "rss": 0.0, "pss": 0.0, "hwm": 0.0, "cpu": 0.0,
                                           "anon": 0.0, "file": 0.0})
                for k in ("rss", "pss", "hwm", "cpu", "anon", "file"):
                    p[k] = max(p[k], m[k])
            peak_rss_sum, peak_pss_sum = max(peak_rss_sum, rss_sum), max(peak_pss_sum, pss_sum)
            peak_anon_sum = max(peak_anon_sum, anon_sum)
            if first_shard is None and shards_dir.exists() and any(shards_dir.glob("shard-*.json")):
                first_shard = time.monotonic() - t0
            time.sleep(0.25)
    total = time.monotonic() - t0
    stdout = (out / "stdout.txt").read_text()
    finished = len(list(shards_dir.glob("shard-*.json")))
    index = json.loads((shards_dir / "index.json").read_text()) if not killed else {
        "failed": None, "total": None, "complete": False, "shards": []}
    by_role: dict[str, list] = {}
    for p in peaks.values():
        by_role.setdefault(p["role"], []).append({k: round(v, 1) for k, v in p.items() if k != "role"})
    return {"workers": workers, "exit": proc.returncode, "killed_after_max_s": killed,
            "shards_finished": finished, "seconds": round(total, 1),
            "first_shard_s": None if first_shard is None else round(first_shard, 1),
            "peak_rss_sum_mb": round(peak_rss_sum), "peak_pss_sum_mb": round(peak_pss_sum),
            "peak_anon_sum_mb": round(peak_anon_sum),
            "hwm_sum_mb": round(sum(p["hwm"] for p in peaks.values())),
            "cpu_s": round(sum(p["cpu"] for p in peaks.values()), 1), "processes": by_role,
            "index": {k: index[k] for k in ("failed", "total", "complete")} | {"shards": len(index["shards"])},
            "summary": stdout.strip().splitlines()[:3]}


def make_failed_shards(shards_dir: Path, num_shards: int, per_shard: int) -> None:
    """`num_shards` finished shards whose rows all failed `not_found`, in the real format (ShardStats
    + stats_text; the empty tar ShardWriter makes), without the per-file fsync of a real run."""
    from data_pipeline.stats import ShardStats, stats_text
    from data_pipeline.writer import ShardWriter, shard_name, stats_name

    shutil.rmtree(shards_dir, ignore_errors=True)
    shards_dir.mkdir(parents=True)
    w = ShardWriter(shards_dir / "empty.tar")
    w.commit()
    empty = (shards_dir / "empty.tar").read_bytes()
    (shards_dir / "empty.tar").unlink()
    for n in range(num_shards):
        st = ShardStats(shard=n, rows=(n * per_shard, (n + 1) * per_shard), config_hash="bench",
                        encoder={"name": "tiny", "dim": 32}, tar_bytes=len(empty), items=per_shard)
        for r in range(n * per_shard, (n + 1) * per_shard):
            vid = 1_000_000 + r * 7
            st.fail(r, str(vid), "not_found", f"no such file /nonexistent/shutterstock/videos/{vid}/preview/"
                    f"stock-footage-a-man-walking-on-the-beach-at-sunset.mp4")
        (shards_dir / shard_name(n)).write_bytes(empty)
        (shards_dir / stats_name(n)).write_text(stats_text(st.to_json()), encoding="utf-8")
    (shards_dir / "index.json").write_text(json.dumps({"config_hash": "bench"}))


def bench_merge(shards_dir: Path, num_shards: int) -> dict:
    return _run_child(textwrap.dedent(f"""
        import json, time
        from pathlib import Path
        from data_pipeline.stats import merge_index, read_stats
        d = Path({str(shards_dir)!r})
        h = json.loads((d / 'index.json').read_text())['config_hash']
        t = time.perf_counter()
        s = merge_index(d, {num_shards}, h, {{'frames': 8}}, 'mp4')
        merge = time.perf_counter() - t
        t = time.perf_counter()
        n = sum(len(read_stats(d, i)['failures']) for i in range({num_shards}))
        RESULT = {{'merge_s': merge, 'shards': s.shards, 'rows': s.rows, 'failed': s.failed,
                   'full_parse_s': time.perf_counter() - t, 'failures_parsed': n,
                   'json_bytes': sum(p.stat().st_size for p in d.glob('shard-*.json'))}}
    """))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--dir", default="/tmp/bench_manifest")
    p.add_argument("--no-in-memory", action="store_true", help="skip the old in-memory parse (needs ~7 GB at 10M)")
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--max-run-s", type=float, default=0, help="stop a sharding run after this long (0: never); "
                   "its memory peaks and shards/s still count, its index is not written")
    p.add_argument("--baseline-root", default="", help="also time the in-memory parse of this source tree "
                   "(e.g. `git archive <commit> data_pipeline trainer model | tar -x -C DIR`)")
    p.add_argument("--merge-only", type=int, default=0, metavar="SHARDS",
                   help="only the merge, over this many written shards of --samples-per-shard failed rows")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    args = p.parse_args(argv)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    if args.merge_only:
        t0 = time.perf_counter()
        make_failed_shards(d / "merge_shards", args.merge_only, args.samples_per_shard)
        res = {"command": " ".join(sys.argv), "write_s": time.perf_counter() - t0,
               "merge": bench_merge(d / "merge_shards", args.merge_only)}
        text = json.dumps(res, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    manifest = write_manifest(d / f"webvid_{args.rows}.csv", args.rows)
    from testing.tiny_bert import make_tiny_bert

    encoder = d / "tiny_bert"
    if not (encoder / "config.json").exists():
        make_tiny_bert(encoder, hidden_size=32)
    results: dict = {"command": " ".join(sys.argv), "rows": args.rows, "manifest_bytes": manifest.stat().st_size, "cpus": os.cpu_count(),
                     "load_avg_start": os.getloadavg()}
    if not args.skip_load:
        results["load"] = bench_load(manifest, d / "cache", not args.no_in_memory,
                                     Path(args.baseline_root) if args.baseline_root else None)
        print(json.dumps(results["load"], indent=1), file=sys.stderr)
    results["runs"] = []
    for w in args.workers:
        r = bench_run(manifest, d / f"run_w{w}", str(encoder), w, args.samples_per_shard, args.max_run_s)
        results["runs"].append(r)
        print(json.dumps(r, indent=1), file=sys.stderr)
    done = [r for r in results["runs"] if not r["killed_after_max_s"]]
    if done:  # merge the first complete run's shards again, in a fresh process
        results["merge"] = bench_merge(d / f"run_w{done[0]['workers']}" / "shards", -(-args.rows // args.samples_per_shard))
    results["load_avg_end"] = os.getloadavg()
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
