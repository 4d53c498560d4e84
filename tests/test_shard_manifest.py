"""Manifests in csv / parquet / jsonl, WebVid-10M columns, column mapping, per-row refusals, keys."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import ColumnsConfig
from data_pipeline.manifest import Manifest, ManifestError, sanitise_key

WEBVID = ("videoid,contentUrl,duration,page_dir,name\n"
          "1066674,https://example.com/a.mp4,PT00H00M15S,001,\"Aerial shot, of a city\"\n"
          "21,https://example.com/b.mp4,PT00H00M09S,002,Dog runs\n")


def test_webvid_csv_columns_work_out_of_the_box(tmp_path):
    p = tmp_path / "results_2M_val.csv"
    p.write_text(WEBVID)
    m = Manifest(str(p))
    assert m.columns == ("videoid", "contentUrl", "name") and len(m) == 2
    rows = m.shard_rows(0, 10)
    assert [r.key for r in rows] == ["1066674", "21"]
    assert rows[0].source == "https://example.com/a.mp4" and rows[0].caption == "Aerial shot, of a city"
    assert all(r.reject is None for r in rows)


def test_parquet_with_int_keys_and_jsonl(tmp_path):
    pq.write_table(pa.table({"videoid": [5, 6], "contentUrl": ["/a.mp4", "/b.mp4"], "name": ["x y", "z"]}),
                   tmp_path / "m.parquet")
    rows = Manifest(str(tmp_path / "m.parquet")).shard_rows(0, 10)
    assert [(r.key, r.source, r.caption) for r in rows] == [("5", "/a.mp4", "x y"), ("6", "/b.mp4", "z")]
    lines = [json.dumps({"id": "k1", "url": "/a.mp4", "text": "a red square"}), "{not json", "",
             json.dumps({"id": "k2", "url": "/b.mp4", "text": "bad \udc80 caption"})]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    rows = Manifest(str(tmp_path / "m.jsonl")).shard_rows(0, 10)
    assert len(rows) == 3  # the broken line keeps its position as a failed row; blank lines are skipped
    assert rows[0].reject is None and rows[0].caption == "a red square"
    assert rows[1].reject == "bad_key"
    assert rows[2].reject == "caption_not_utf8"


def test_column_mapping_and_missing_column(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("vid,location,desc\nk,/x.mp4,hello\n")
    with pytest.raises(ManifestError, match="columns.key"):
        Manifest(str(p))
    m = Manifest(str(p), columns=ColumnsConfig(key="vid", source="location", caption="desc"))
    assert m.shard_rows(0, 1)[0].caption == "hello"
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ManifestError, match="cannot infer"):
        Manifest(str(tmp_path / "m.txt"))
    with pytest.raises(ManifestError, match="does not exist"):
        Manifest(str(tmp_path / "nope.csv"))


def test_row_level_refusals_in_csv(tmp_path):
    p = tmp_path / "m.csv"
    body = (b"key,path,caption\n"
            b"good,/a.mp4,a red square\n"
            b"../../etc/passwd,/b.mp4,a caption\n"
            b"dir/name,/c.mp4,a caption\n"
            b"empty_cap,/d.mp4,   \n"
            b"good,/e.mp4,duplicate key\n"
            b"dotted.key v2,/f.mp4,a caption\n")
    body += b"latin1,/g.mp4,caf\xe9 au lait\n"
    p.write_bytes(body)
    rows = Manifest(str(p)).shard_rows(0, 100)
    got = {r.raw_key if r.raw_key != "good" else f"good@{r.index}": r.reject for r in rows}
    assert got == {"good@0": None, "../../etc/passwd": "unsafe_key", "dir/name": "unsafe_key",
                   "empty_cap": "empty_caption", "good@4": "duplicate_key", "dotted.key v2": None,
                   "latin1": "caption_not_utf8"}
    dotted = rows[5]
    assert dotted.key.startswith("dotted_key_v2-") and "." not in dotted.key


def test_sanitise_key_is_stable_and_collision_free():
    assert sanitise_key("abc_12-3") == ("abc_12-3", None)
    a, b = sanitise_key("a.b")[0], sanitise_key("a_b")[0]
    assert a != b and a == sanitise_key("a.b")[0]
    assert sanitise_key("..")[1] == "unsafe_key" and sanitise_key("")[1] == "bad_key"
    assert sanitise_key("x\\y")[1] == "unsafe_key"
    assert len(sanitise_key("k" * 500)[0]) <= 110


def test_shard_rows_are_stable_slices(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("key,path,caption\n" + "".join(f"k{i},/v{i}.mp4,cap {i}\n" for i in range(10)))
    m = Manifest(str(p))
    assert m.num_shards(4) == 3
    assert [r.index for r in m.shard_rows(1, 4)] == [4, 5, 6, 7]
    assert [r.key for r in m.shard_rows(2, 4)] == ["k8", "k9"]
