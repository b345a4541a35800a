"""`gdscache bench` with tiny shapes: the report's fields, the plot, cleanup, and bad arguments."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from gdscache.bench.data import synthetic_kv
from gdscache.bench.engine import _paired
from gdscache.bench.models import PRESETS, resolve_model
from gdscache.bench.prefill import estimate_prefill, measure_prefill
from gdscache.bench.sysinfo import filesystem_of
from gdscache.cli.main import main
from io_backends.posix import PosixBackend

# 2 layers x 2 planes x 2 heads x 16 dims x 2 bytes = 256 bytes per token
TINY = ["--model", "llama-8b", "--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--tokens", "256",
        "--chunk-size", "64,128", "--total-size", "128KiB", "--latency-chunks", "3", "--device", "cpu", "--rounds", "2"]


def _bench_dirs(path) -> list[str]:
    return [n for n in os.listdir(path) if n.startswith("gdscache-bench-")]


def test_bench_json_plot_and_cleanup(tmp_path, capsys):
    target = tmp_path / "disk"
    report_file, png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["bench", "--path", str(target), *TINY, "--codecs", "raw,lossless", "--json", str(report_file),
            "--plot", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "raw ceiling" in out and "TTFT" in out and "lossless" in out
    report = json.loads(report_file.read_text())
    meta = report["meta"]
    assert meta["io_mode"] in ("posix-odirect", "posix-buffered") and meta["storage"] == "posix"
    assert meta["batch_reads"] == "per file" and f"batch_reads={meta['batch_reads']}" in out
    assert meta["batch_writes"] == "per file" and f"batch_writes={meta['batch_writes']}" in out
    assert meta["raw_batch_writes"] == "per file"
    assert meta["filesystem"]["fstype"] == filesystem_of(str(target))["fstype"] != "unknown"
    assert meta["device"] == "cpu" and meta["bytes_per_token"] == 256
    assert meta["requests"] == 2 and meta["kv_bytes_per_config"] == 2 * 256 * 256
    assert meta["command"].startswith("gdscache bench --path")
    assert meta["model"]["num_layers"] == 2 and meta["kv_dtype"] == "bfloat16"
    assert meta["rounds"] == 2 and "raw" not in report
    assert meta["write_mode"] == "async" and "write_mode=async" in out
    results = report["results"]
    assert [(r["codec"], r["chunk_size"]) for r in results] == [("raw", 64), ("lossless", 64), ("raw", 128),
                                                                ("lossless", 128)]
    for r in results:
        assert r["request_tokens"] == 256 and r["check"] == {"lossless": True, "exact": True}
        assert r["raw"]["rounds"] == 2 and r["raw"]["bytes"] == 2 * 256 * 256
        assert r["raw"]["io_mode"] == meta["raw_io_mode"]
        for op, raw_key in (("store", "write_gbps"), ("retrieve_cold", "read_cold_gbps"),
                            ("retrieve_warm", "read_warm_gbps")):
            assert r[op]["gbps"] > 0 and r[op]["tokens_per_s"] > 0 and r["raw"][raw_key] > 0
            assert r[op]["pct_of_raw"] == pytest.approx(100 * r[op]["gbps"] / r["raw"][raw_key])
            # total over total is a mediant of the rounds' ratios: it lies between them
            by_round = r[op]["pct_by_round"]
            assert len(by_round) == 2 and min(by_round) * 0.999 <= r[op]["pct_of_raw"] <= max(by_round) * 1.001
        assert set(r["latency_ms"]) == {"store", "retrieve_cold", "retrieve_warm"}
        assert all(v["n"] == 3 and 0 < v["p50"] <= v["p99"] for v in r["latency_ms"].values())
        assert r["ttft"]["prefill_method"] == "estimated" and r["ttft"]["retrieve_from"] == "cold"
        assert r["ttft"]["saved_s"] == pytest.approx(r["ttft"]["prefill_s"] - r["ttft"]["retrieve_s"])
    raw64 = results[0]
    assert raw64["ratio"] == pytest.approx(1.0) and raw64["stored_bytes"] == 2 * 256 * 256
    assert results[1]["stored_bytes"] > 0
    assert report["prefill"]["256"]["method"] == "estimated" and "TFLOP/s" in report["prefill"]["256"]["detail"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _bench_dirs(target) == []


def test_bench_keep_and_cold_only(tmp_path, capsys):
    report_file = tmp_path / "r.json"
    assert main(["bench", "--path", str(tmp_path), *TINY, "--cold", "--keep", "--write-mode", "sync", "--json",
                 str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert report["meta"]["write_mode"] == "sync"
    kept = report["meta"]["kept"]
    assert kept and _bench_dirs(tmp_path) == [os.path.basename(kept)]
    assert any(n.endswith(".gdc") for _, _, names in os.walk(kept) for n in names)
    assert all("retrieve_warm" not in r and "retrieve_cold" in r for r in report["results"])
    assert all("read_warm_gbps" not in r["raw"] and r["raw"]["read_cold_gbps"] > 0 for r in report["results"])
    assert not [n for _, _, names in os.walk(kept) for n in names if n.startswith("raw-")]
    assert f"files kept in {kept}" in capsys.readouterr().out.replace("\n", "")


def test_bench_fails_when_the_disk_refuses_a_chunk_after_store_returned(tmp_path, monkeypatch):
    """In async mode store() counts the chunks it accepted; a chunk the disk refuses later still fails the run."""
    def refuse(self, files, *, durable=True):
        return [OSError(errno.EIO, f"refused {path}") for path, _ in files]

    monkeypatch.setattr(PosixBackend, "write_files", refuse)
    with pytest.raises(RuntimeError, match=r"chunk write\(s\) failed"):
        main(["bench", "--path", str(tmp_path), *TINY, "--codecs", "raw"])


def test_paired_rounds_alternate_and_verify_after_each_raw_side():
    calls = []
    pairs = _paired([[0], [1, 2], [3]], lambda r, idx: calls.append(("raw", r, idx)),
                    lambda r, idx: calls.append(("cache", r, idx)), torch.device("cpu"),
                    after_raw=lambda r: calls.append(("verify", r)))
    assert calls == [("raw", 0, [0]), ("verify", 0), ("cache", 0, [0]),
                     ("cache", 1, [1, 2]), ("raw", 1, [1, 2]), ("verify", 1),
                     ("raw", 2, [3]), ("verify", 2), ("cache", 2, [3])]
    assert len(pairs) == 3 and all(raw_s >= 0 and cache_s >= 0 for raw_s, cache_s in pairs)


def test_bench_has_a_prompt_for_every_round(tmp_path):
    """A --total-size of fewer prompts than --rounds is raised to one prompt per round (the default run's case:
    one Llama-8B prompt is 512 MiB)."""
    report_file = tmp_path / "r.json"
    argv = ["bench", "--path", str(tmp_path), *TINY, "--rounds", "4", "--chunk-size", "64", "--warm",
            "--latency-chunks", "0", "--json", str(report_file)]
    assert main(argv) == 0
    report = json.loads(report_file.read_text())
    assert report["meta"]["requests"] == 4 and report["meta"]["rounds"] == 4
    assert report["meta"]["kv_bytes_per_config"] == 4 * 256 * 256
    (res,) = report["results"]
    assert res["raw"]["rounds"] == 4 and len(res["store"]["pct_by_round"]) == 4
    assert len(res["retrieve_warm"]["pct_by_round"]) == 4


@pytest.mark.parametrize("o_direct", ["on", "off"])
def test_bench_raw_side_moves_the_bytes_the_cache_stores(tmp_path, monkeypatch, o_direct):
    """--tokens not a multiple of --chunk-size: the cache stores whole chunks only, and the raw side writes and
    reads as many bytes (counted where they enter the backend); its copies stay 4 KiB apart for O_DIRECT."""
    moved = {"written": 0, "read": 0}
    write_file, open_read = PosixBackend.write_file, PosixBackend.open_read

    def counted_write(self, path, parts, **kwargs):
        if os.path.basename(path).startswith("raw-"):
            moved["written"] += sum(part.nbytes for part in parts)
        return write_file(self, path, parts, **kwargs)

    def counted_open(self, path):
        handle = open_read(self, path)
        if os.path.basename(path).startswith("raw-"):
            read_into = handle.read_into

            def counted_read(dest, offset):
                moved["read"] += dest.numel()
                return read_into(dest, offset)

            handle.read_into = counted_read
        return handle

    monkeypatch.setattr(PosixBackend, "write_file", counted_write)
    monkeypatch.setattr(PosixBackend, "open_read", counted_open)
    report_file = tmp_path / "r.json"
    # 210 tokens in chunks of 40: requests of 200 tokens = 51200 bytes, not a multiple of 4 KiB
    argv = ["bench", "--path", str(tmp_path), *TINY, "--tokens", "210", "--chunk-size", "40", "--total-size", "256KiB",
            "--cold",
            "--latency-chunks", "0", "--o-direct", o_direct, "--json", str(report_file)]
    assert main(argv) == 0
    (res,) = json.loads(report_file.read_text())["results"]
    assert res["request_tokens"] == 200 and res["requests"] == 5  # rounds of 3 and 2 requests: copies at offsets > 0
    assert moved["written"] == moved["read"] == res["raw"]["bytes"] == res["stored_bytes"] == res["requests"] * 200 * 256


def test_bench_lossy_codec_reports_its_error(tmp_path):
    """Two rounds: in the second the raw read runs after the cache's retrieve, and must not overwrite its output."""
    report_file = tmp_path / "r.json"
    argv = ["bench", "--path", str(tmp_path), *TINY, "--chunk-size", "64", "--codecs", "cachegen", "--warm",
            "--latency-chunks", "0", "--json", str(report_file)]
    assert main(argv) == 0
    (res,) = json.loads(report_file.read_text())["results"]
    assert res["check"]["lossless"] is False and 0 < res["check"]["max_rel_err"] < 0.1
    assert res["ratio"] > 1 and "latency_ms" not in res


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--codecs", "zstd"], "unknown codec 'zstd'"),
        (["--chunk-size", "512"], "--chunk-size 512 exceeds --tokens 256"),
        (["--chunk-size", "a,b"], "--chunk-size takes comma-separated integers"),
        (["--total-size", "big"], "cannot parse size 'big'"),
        (["--model", "gpt-5"], "unknown model preset 'gpt-5'"),
        (["--kv-heads", "0"], "--kv-heads must be a positive integer"),
        (["--dtype", "int8"], "unknown KV dtype 'int8'"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--device", "tpu"], "--device must be 'cpu' or 'cuda'"),
        (["--json", "/nonexistent-dir/r.json"], "--json /nonexistent-dir/r.json: directory /nonexistent-dir does not"),
    ],
)
def test_bench_bad_arguments(tmp_path, capsys, extra, message):
    assert main(["bench", "--path", str(tmp_path), *TINY, *extra]) == 2
    assert message in capsys.readouterr().err
    assert _bench_dirs(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_bench_cuda_without_a_gpu_fails_clearly(tmp_path, capsys):
    assert main(["bench", "--path", str(tmp_path), *TINY, "--device", "cuda"]) == 2
    assert "--device cuda: no usable CUDA device" in capsys.readouterr().err


def test_bench_refuses_when_the_disk_is_too_small(tmp_path, capsys):
    assert main(["bench", "--path", str(tmp_path), *TINY, "--total-size", "1PB"]) == 2
    assert "GB free but the benchmark needs" in capsys.readouterr().err


def test_model_presets_and_overrides():
    llama = resolve_model("llama-8b")
    assert llama.kv_spec(torch.bfloat16).bytes_per_token() == 32 * 2 * 8 * 128 * 2
    assert resolve_model("qwen-class") is PRESETS["qwen2.5-7b"]
    custom = resolve_model("llama-8b", kv_heads=2, head_dim=64)
    assert (custom.num_q_heads, custom.hidden_size, custom.num_layers) == (8, 512, 32)
    assert custom.intermediate_size == round(512 * 14336 / 4096)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        resolve_model("llama-8b", kv_heads=3, q_heads=8)


def test_prefill_flops_and_estimate():
    m = resolve_model("llama-8b", layers=1, kv_heads=1, head_dim=2, q_heads=2, hidden_size=4, intermediate_size=8)
    # per layer: 2*T*h*(2q+2kv) + 6*T*h*I + 2*T*T*q with T=10, h=4, q=4, kv=2, I=8
    assert m.prefill_flops(10) == 2 * 10 * 4 * (8 + 4) + 6 * 10 * 4 * 8 + 2 * 100 * 4
    est = estimate_prefill(resolve_model("llama-8b"), 4096, tflops=100)
    assert est.method == "estimated" and est.seconds == pytest.approx(resolve_model("llama-8b").prefill_flops(4096) / 1e14)
    with pytest.raises(ValueError, match="prefill-tflops"):
        estimate_prefill(m, 10, tflops=0)


def test_measure_prefill_runs_a_model_shaped_forward_pass():
    m = resolve_model("llama-8b", layers=6, kv_heads=2, head_dim=16)
    p = measure_prefill(m, 32, torch.device("cpu"), torch.float32, layers=2, repeats=1)
    assert p.method == "measured" and p.seconds > 0 and "scaled x3 to 6 layers" in p.detail


def test_synthetic_kv_is_deterministic_and_aligned():
    spec = resolve_model("llama-8b", layers=2, kv_heads=2, head_dim=16).kv_spec(torch.bfloat16)
    a = synthetic_kv(spec, 64, torch.device("cpu"), seed=3)
    b = synthetic_kv(spec, 64, torch.device("cpu"), seed=3)
    assert a.shape == (2, 2, 64, 2, 16) and torch.equal(a, b) and a.data_ptr() % 4096 == 0
    assert not torch.equal(a, synthetic_kv(spec, 64, torch.device("cpu"), seed=4))
    # neighbouring tokens are closer than distant ones (the structure codecs exploit)
    f = a.float()
    assert (f[:, :, 1:] - f[:, :, :-1]).abs().mean() < (f[:, :, 32:] - f[:, :, :-32]).abs().mean()


def test_filesystem_of_picks_the_longest_mount(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/a / ext4 rw 0 0\n/dev/b /mnt/weka wekafs rw 0 0\nsrv:/x /mnt/we\\040ka nfs4 rw 0 0\n")
    assert filesystem_of("/mnt/weka/kv", str(mounts)) == {"fstype": "wekafs", "mount_point": "/mnt/weka",
                                                          "source": "/dev/b"}
    assert filesystem_of("/mnt/we ka/y", str(mounts))["fstype"] == "nfs4"
    assert filesystem_of("/mnt/wekaX", str(mounts))["fstype"] == "ext4"
