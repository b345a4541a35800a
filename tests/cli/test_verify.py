"""`gdscache verify [--repair]` on real chunk files, one of them corrupted."""

from __future__ import annotations

import json
import os

import torch

from gdscache import GDSCache
from gdscache.cli.main import main
from gdscache.cli.scan import iter_chunks
from gdscache.format.chunkfile import PAYLOAD_OFFSET

CHUNK = 16  # as in conftest.populated




def _flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_verify_clean_cache(populated, capsys):
    assert main(["verify", str(populated)]) == 0
    assert "checked 6 chunks" in capsys.readouterr().out


def test_verify_finds_and_repair_removes_a_corrupt_payload(populated, capsys):
    chunks = list(iter_chunks(str(populated)))
    victim = chunks[0]
    _flip_byte(victim.path, PAYLOAD_OFFSET + 5)
    assert main(["verify", str(populated), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["checked"] == 6 and report["removed"] == 0
    assert [b["path"] for b in report["bad"]] == [victim.path]
    assert "checksum" in report["bad"][0]["reason"]
    assert os.path.exists(victim.path)

    assert main(["verify", str(populated), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "1 bad, 1 removed" in out and victim.path in out
    assert not os.path.exists(victim.path)
    assert main(["verify", str(populated)]) == 0
    assert "checked 5 chunks" in capsys.readouterr().out


def test_verify_reports_bad_header_and_wrong_name(populated, capsys):
    chunks = list(iter_chunks(str(populated)))
    _flip_byte(chunks[1].path, 0)  # magic
    other = chunks[2]
    renamed = os.path.join(os.path.dirname(other.path), "0" * 32 + ".gdc")
    os.rename(other.path, renamed)
    assert main(["verify", str(populated), "--json"]) == 1
    bad = {b["path"]: b["reason"] for b in json.loads(capsys.readouterr().out)["bad"]}
    assert "bad magic" in bad[chunks[1].path]
    assert "file name says" in bad[renamed]


def test_repaired_cache_still_serves_the_good_prefix(populated, model_a):
    tokens, kv = model_a
    out = torch.zeros_like(kv)
    with GDSCache(path=str(populated), chunk_size=CHUNK, model_id="model-a", storage="posix") as cache:
        assert cache.retrieve(tokens, out) == 4 * CHUNK
        third = cache._local.path_of(cache.namespace, cache.chunk_keys(tokens)[2])
    _flip_byte(third, PAYLOAD_OFFSET)
    assert main(["verify", str(populated), "--repair"]) == 0
    assert not os.path.exists(third)
    out.zero_()
    with GDSCache(path=str(populated), chunk_size=CHUNK, model_id="model-a", storage="posix") as cache:
        assert cache.retrieve(tokens, out) == 2 * CHUNK
    assert torch.equal(out[:, :, : 2 * CHUNK], kv[:, :, : 2 * CHUNK])


def test_verify_bad_threads(populated, capsys):
    assert main(["verify", str(populated), "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
