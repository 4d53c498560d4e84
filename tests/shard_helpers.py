"""Helpers for the sharding tests: real bad/odd video files and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import csv
import http.server
import threading
import time
from pathlib import Path

import av
import numpy as np

from common.mp4 import write_video
from data_pipeline.synthetic import render_clip


def frames(t: int = 12, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return render_clip(("square", "circle", "triangle")[seed % 3], "red", "right", t, h, w, (h / 2, w / 3))


def make_h264(path: Path, t: int = 12, h: int = 32, w: int = 32, fps: float = 8, **kw) -> Path:
    write_video(path, frames(t, h, w), fps, codec="libx264", **kw)
    return path


LEVEL_FPS, LEVEL_FRAMES = 8, 96  # 12 s; frame k is a flat colour that names it: red codes k % 8, green k // 8


def level_video(path: Path) -> Path:
    """12 s of h264 at 8 fps whose every frame says which frame it is (source_frames reads it back),
    with a keyframe every 2 s: span tests see exactly which frames a clip came from."""
    k = np.arange(LEVEL_FRAMES)
    colours = np.stack([40 + (k % 8) * 25, 40 + (k // 8) * 15, np.full(LEVEL_FRAMES, 128)], axis=1).astype(np.uint8)
    frames = np.broadcast_to(colours[:, None, None, :], (LEVEL_FRAMES, 32, 32, 3)).copy()
    write_video(path, frames, LEVEL_FPS, codec="libx264", g="16", crf="4", bf="0")
    return path


def source_frames(clip: np.ndarray) -> list[int]:
    """Which level_video frame each clip frame is (colour steps of 25 and 15 outlast the codec's error)."""
    r, g = clip[..., 0].mean(axis=(1, 2)), clip[..., 1].mean(axis=(1, 2))
    return [int(round((ri - 40) / 25)) + 8 * int(round((gi - 40) / 15)) for ri, gi in zip(r, g)]


def make_rotated_mp4(path: Path, rotation: float) -> Path:
    """48x32 h264 with a display matrix (counter-clockwise degrees) and a white top-left marker."""
    data = np.zeros((8, 32, 48, 3), np.uint8)
    data[:, :8, :8] = 255
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 48, 32, "yuv420p"
        s.set_display_rotation(rotation)
        for i, a in enumerate(data):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts = i
            out.mux(s.encode(f))
        out.mux(s.encode(None))
    return path


def make_rotate_tag_mkv(path: Path, tag: str) -> Path:
    """mpeg4 in Matroska with a legacy `rotate` stream tag (which may be nonsense)."""
    with av.open(str(path), "w", format="matroska") as out:
        s = out.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        s.metadata["rotate"] = tag
        for i, a in enumerate(frames(12)):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            f.pts = i
            out.mux(s.encode(f))
        out.mux(s.encode(None))
    return path


def make_vfr_mp4(path: Path, times: list[float]) -> Path:
    """h264 whose frame i shows a grey level 10*i and is stamped at times[i] seconds (variable rate)."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=1000)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        s.codec_context.time_base = av.time_base and __import__("fractions").Fraction(1, 1000)
        for i, t in enumerate(times):
            f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * i, np.uint8), format="rgb24")
            f.pts = round(t * 1000)
            f.time_base = __import__("fractions").Fraction(1, 1000)
            out.mux(s.encode(f))
        out.mux(s.encode(None))
    return path


def make_audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="wav") as out:
        s = out.add_stream("pcm_s16le", rate=8000)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        out.mux(s.encode(frame))
        out.mux(s.encode(None))
    return path


def make_bad_files(d: Path) -> dict[str, Path]:
    """One file per kind of bad input, named by the reason the sharder must give."""
    d.mkdir(parents=True, exist_ok=True)
    good = make_h264(d / "good_for_truncation.mp4", t=16)
    out = {}
    (d / "zero.mp4").write_bytes(b"")
    out["empty_file"] = d / "zero.mp4"
    (d / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    out["unreadable_container"] = d / "truncated.mp4"
    (d / "text.mp4").write_bytes(b"this is not a video, just some bytes\n" * 50)
    out["unreadable_container_text"] = d / "text.mp4"
    out["no_video_stream"] = make_audio_only(d / "audio.wav")
    out["too_short"] = make_h264(d / "short.mp4", t=3)
    out["bad_rotation"] = make_rotate_tag_mkv(d / "rot.mkv", "sideways")
    write_video(d / "huge.mp4", np.zeros((1, 16, 4200, 3), np.uint8), 8, codec="mpeg4")
    out["resolution_too_large"] = d / "huge.mp4"
    out["not_found"] = d / "does_not_exist.mp4"
    return out


def write_manifest(path: Path, rows: list[tuple[str, str, str]], header=("key", "path", "caption")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: dict[str, int] = {}
    answered: dict[str, int] = {}  # requests whose handler returned (a hang counts once released)
    release: threading.Event = threading.Event()  # ends the /hang requests (set on server exit)
    # path → answers before the file is served: an HTTP status to send, 0 = accept and never answer,
    # -1 = trickle (headers, then a byte every 0.1 s: every read answers, the download never ends)
    fail_first: dict[str, list[int]] = {}

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        self.hits[path] = self.hits.get(path, 0) + 1
        failures = self.fail_first.get(path, [])
        if self.hits[path] <= len(failures):
            code = failures[self.hits[path] - 1]
            if code > 0:
                self.send_error(code, "planned failure")
            elif code == 0:
                self.release.wait(10)  # a server that accepted the request and hangs
            else:
                self._trickle(1 << 20)
        elif path == "/500":
            self.send_error(500, "boom")
        elif path == "/flaky":  # 503 twice, then the file: retries with backoff must get it
            if self.hits[path] <= 2:
                self.send_error(503, "busy")
            else:
                self._send(self.files["/ok.mp4"])
        elif path.startswith("/slow/") and path[5:] in self.files:  # a slow but working server
            time.sleep(0.3)
            self._send(self.files[path[5:]])
        elif path == "/hang":  # accept, then never answer: until released, or 10 s at most
            self.release.wait(10)
        elif path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 1024 * 1024))
            self.end_headers()
        elif path == "/big-no-length":  # no Content-Length: the cap must hold while streaming
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass
        elif path == "/redirect-file":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        elif path == "/redirect-ok":
            self.send_response(302)
            self.send_header("Location", "/ok.mp4")
            self.end_headers()
        elif path in self.files:
            self._send(self.files[path])
        else:
            self.send_error(404, "nope")
        self.answered[path] = self.answered.get(path, 0) + 1

    def _trickle(self, length: int):
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        try:
            for _ in range(100):  # 10 s at most
                if self.release.wait(0.1):
                    return
                self.wfile.write(b"\0")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, data: bytes):
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class VideoServer:
    """http.server on 127.0.0.1 in a thread; `files` maps URL paths to bytes; `fail_first` maps a
    path to the answers it gets before its file is served (e.g. [500, 500]; 0 = hang)."""

    def __init__(self, files: dict[str, bytes], fail_first: dict[str, list[int]] | None = None):
        handler = type("H", (_Handler,), {"files": dict(files), "hits": {}, "answered": {},
                                          "release": threading.Event(), "fail_first": dict(fail_first or {})})
        self.handler = handler
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> VideoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.handler.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def hits(self) -> dict[str, int]:
        return self.handler.hits

    @property
    def answered(self) -> dict[str, int]:
        return self.handler.answered


def decode_mp4_bytes(data: bytes) -> np.ndarray:
    import io

    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def tar_members(out: Path) -> dict[str, bytes]:
    import tarfile

    members: dict[str, bytes] = {}
    for p in sorted(Path(out).glob("shard-*.tar")):
        with tarfile.open(p) as tf:
            members.update({f"{p.name}/{m.name}": tf.extractfile(m).read() for m in tf.getmembers()})
    return members


def assert_identical_shards(a: Path, b: Path) -> None:
    """Same shards, same members in the same order, every member byte-identical (mp4s included: the
    clip encode in common/mp4.py pins everything that could vary between runs or processes)."""
    ma, mb = tar_members(a), tar_members(b)
    assert list(ma) == list(mb), "member lists differ"
    differing = [k for k in ma if ma[k] != mb[k]]
    assert not differing, f"{len(differing)} members differ: {differing[:10]}"


def shard_small_npy(manifest: Path, out: Path, encoder: str, max_failure_ratio: float) -> dict[str, dict]:
    """Run the shard CLI in-process on `manifest` (8 frames at 8 fps, 16x16, npy storage, one shard)
    and return the samples of shard-000000.tar by key, read with webdataset."""
    import webdataset as wds
    import yaml

    from data_pipeline.shard import main

    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump({"manifest": str(manifest), "out_dir": str(out), "samples_per_shard": 10,
                                   "clip": {"frames": 8, "fps": 8, "height": 16, "width": 16},
                                   "storage": {"format": "npy"}, "encoder": {"name_or_path": encoder},
                                   "max_failure_ratio": max_failure_ratio}))
    assert main(["--config", str(cfg), "--no-progress"]) == 0
    return {s["__key__"]: s for s in wds.WebDataset([str(out / "shard-000000.tar")], shardshuffle=False)}
