"""`gdscache ls` and `gdscache stats` on real chunk files."""

from __future__ import annotations

import json
import os

from gdscache.cli.main import main
from gdscache.cli.scan import iter_chunks


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_ls_json_lists_each_model_with_its_chunks(populated, capsys):
    assert main(["ls", str(populated), "--json"]) == 0
    rows = {r["model_id"]: r for r in _json(capsys)}
    assert set(rows) == {"model-a", "model-b"}
    a = rows["model-a"]
    assert a["chunks"] == 4 and a["chunk_size"] == 16 and a["codec"] == "raw"
    assert a["dtype"] == "bfloat16" and a["shape"] == [2, 2, 2, 8] and a["tp"] == "0/1"
    sizes = [c.size for c in iter_chunks(str(populated)) if c.namespace == a["namespace"]]
    assert a["bytes"] == sum(sizes) and len(sizes) == 4
    assert a["oldest"] <= a["newest"]
    assert rows["model-b"]["chunks"] == 2


def test_ls_chunks_and_namespace_filter(populated, capsys):
    assert main(["ls", str(populated), "--json"]) == 0
    ns_b = next(r["namespace"] for r in _json(capsys) if r["model_id"] == "model-b")
    assert main(["ls", str(populated), "--chunks", "--namespace", ns_b[:8], "--json"]) == 0
    chunks = _json(capsys)
    assert len(chunks) == 2 and all(c["namespace"] == ns_b and os.path.isfile(c["path"]) for c in chunks)


def test_ls_table_output(populated, capsys):
    assert main(["ls", str(populated)]) == 0
    out = capsys.readouterr().out
    assert "model-a" in out and "model-b" in out and "2 fingerprint(s)" in out


def test_stats_totals(populated, capsys):
    assert main(["stats", str(populated), "--json"]) == 0
    data = _json(capsys)
    chunks = list(iter_chunks(str(populated)))
    assert data["chunks"] == 6 == len(chunks)
    assert data["bytes"] == sum(c.size for c in chunks)
    assert data["namespaces"] == 2 and data["models"] == ["model-a", "model-b"]
    assert data["temp_files"] == 0 and data["quarantined_files"] == 0
    assert data["filesystem"] != "unknown" and data["disk_free_bytes"] > 0


def test_stats_on_empty_directory(tmp_path, capsys):
    assert main(["stats", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "chunks" in out and "0" in out


def test_path_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["ls", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err
