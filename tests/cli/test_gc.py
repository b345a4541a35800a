"""`gdscache gc PATH --max-size SIZE`."""

from __future__ import annotations

import json
import os
import time

from gdscache.cli.main import main
from gdscache.cli.scan import iter_chunks


def test_gc_evicts_least_recently_used_down_to_size(populated, capsys):
    chunks = sorted(iter_chunks(str(populated)), key=lambda c: c.path)
    now = time.time()
    for age, c in enumerate(chunks):  # chunks[0] oldest ... chunks[-1] newest
        os.utime(c.path, (now - 1000 + age, now - 1000 + age))
    limit = sum(c.size for c in chunks[-3:])
    assert main(["gc", str(populated), "--max-size", str(limit), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bytes_before"] == sum(c.size for c in chunks)
    assert result["bytes_after"] <= limit and result["chunks_after"] == 3 and result["evicted"] == 3
    left = {c.path for c in iter_chunks(str(populated))}
    assert left == {c.path for c in chunks[-3:]}


def test_gc_to_zero_and_human_sizes(populated, capsys):
    assert main(["gc", str(populated), "--max-size", "1GiB"]) == 0
    assert "6 chunks" in capsys.readouterr().out
    assert len(list(iter_chunks(str(populated)))) == 6
    assert main(["gc", str(populated), "--max-size", "0"]) == 0
    assert list(iter_chunks(str(populated))) == []


def test_gc_bad_size_and_missing_option(populated, capsys):
    assert main(["gc", str(populated), "--max-size", "lots"]) == 2
    assert "cannot parse size 'lots'" in capsys.readouterr().err
    try:
        main(["gc", str(populated)])
    except SystemExit as exc:
        assert exc.code == 2
    assert "--max-size" in capsys.readouterr().err


def test_gc_refuses_a_directory_that_is_not_a_cache(tmp_path, capsys):
    (tmp_path / "notes.tmp").write_text("keep me")
    assert main(["gc", str(tmp_path), "--max-size", "0"]) == 2
    assert "no gdscache namespace" in capsys.readouterr().err
    assert (tmp_path / "notes.tmp").exists()
