"""CUDA kernels == torch/numpy references, bit for bit, in the bitstream and in the decoded tensor."""

import numpy as np
import pytest
import torch

from gdscache.codecs import _cuda, get_codec, rans
from gdscache.codecs.profile import CodecProfile
from gdscache.pages import KVPages
from gdscache.spec import KVSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def _kernels():
    if not _cuda.available():
        pytest.skip("libgdscache_cuda.so not built (pip install with nvcc, or set GDSCACHE_CUDA_LIB)")


def _kv(dtype, layers=4, tokens=64, heads=3, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(layers, 2, tokens, heads, dim, generator=g)
    x[:, 0, :, :, 5] = x[:, 0, :, :, 5] * 8 + 12  # outlier key channel
    x[1, 1, :3] = 0
    return x.to(dtype)


def _bits(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_rans_kernels_match_reference(group):
    g = torch.Generator().manual_seed(group)
    sym = torch.randint(0, 40, (3, 50, 16), generator=g) * torch.randint(0, 2, (3, 50, 16), generator=g)
    counts = np.stack([np.bincount(sym[r].numpy().ravel(), minlength=64) for r in range(3)])
    tables = rans.Tables(rans.normalize_counts(counts))
    tab = torch.arange(3).view(3, 1).expand(3, 16)
    ref_len, ref_words = rans.encode_ref(sym.numpy(), tab.numpy(), tables.freq, group)
    lengths, words = rans.encode(sym.cuda(), tab.cuda(), tables, group)
    assert np.array_equal(lengths.cpu().numpy().view(np.uint32), ref_len)
    assert np.array_equal(words.cpu().numpy().view(np.uint16), ref_words)
    back = rans.decode(words, lengths, tab.cuda(), tables, tuple(sym.shape), group)
    assert torch.equal(back.cpu().to(torch.int64), sym)
    bad = words.clone()
    bad[3] ^= 0x0F0F
    with pytest.raises(ValueError):
        rans.decode(bad, lengths, tab.cuda(), tables, tuple(sym.shape), group)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("layers", [4, 40])  # 40 fp32 layers: 320 tables, too many to stage in shared memory
def test_lossless_gpu_matches_cpu(dtype, layers):
    kv = _kv(torch.float32, layers=layers, tokens=16 if layers > 4 else 64).to(dtype)
    codec = get_codec("lossless")
    cpu, gpu = codec.encode(kv), codec.encode(kv.cuda())
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    out = torch.empty_like(kv, device="cuda")
    codec.decode(gpu, KVSpec.of(kv), kv.shape[2], out)
    assert torch.equal(_bits(out.cpu()), _bits(kv))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dim", [64, 20])  # 3 x 20 channels: a part-filled statistics tile, 4-channel streams
def test_cachegen_gpu_matches_cpu(dtype, weighted, dim, tmp_path):
    kv = _kv(dtype, dim=dim)
    params = {}
    if weighted:
        w = np.exp(np.random.default_rng(0).normal(0, 0.5, (4, 2, 3 * dim)))
        prof = CodecProfile(np.linspace(0.02, 0.2, 8).reshape(4, 2), w)
        prof.save(tmp_path / "p.json")
        params = {"profile": str(tmp_path / "p.json")}
    codec = get_codec("cachegen", **params)
    cpu, gpu = codec.encode(kv), codec.encode(kv.cuda())
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    spec = KVSpec.of(kv)
    ref = torch.empty_like(kv)
    codec.decode(cpu, spec, kv.shape[2], ref)
    big = torch.zeros(4, 2, 80, 3, dim, dtype=dtype, device="cuda")
    codec.decode(gpu, spec, kv.shape[2], big[:, :, 8:72])
    assert torch.equal(_bits(big[:, :, 8:72].cpu()), _bits(ref))
    assert not big[:, :, :8].any() and not big[:, :, 72:].any()


def test_cachegen_gpu_rejects_corrupt_payload():
    kv = _kv(torch.bfloat16).cuda()
    codec = get_codec("cachegen")
    payload = codec.encode(kv)
    bad = payload.clone()
    bad[-20] ^= 0x55
    with pytest.raises(ValueError):
        codec.decode(bad, KVSpec.of(kv), kv.shape[2], torch.empty_like(kv))


def test_cachegen_gpu_rejects_non_finite():
    kv = _kv(torch.bfloat16).cuda()
    kv[1, 0, 2, 1, 7] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        get_codec("cachegen").encode(kv)


def test_cachegen_batches_match_one_by_one_and_isolate_a_corrupt_chunk():
    codec = get_codec("cachegen")
    kv = torch.cat([_kv(torch.bfloat16, seed=s) for s in range(3)], dim=2).cuda()  # three 64-token chunks
    chunks = [kv[:, :, k * 64:(k + 1) * 64] for k in range(3)]
    batch = codec.encode_many(chunks)
    for chunk, payload in zip(chunks, batch, strict=True):
        assert torch.equal(payload.cpu(), codec.encode(chunk.cpu()))
    spec = KVSpec.of(kv)
    ref = torch.empty(kv.shape, dtype=kv.dtype)
    for k, payload in enumerate(batch):
        codec.decode(payload.cpu(), spec, 64, ref[:, :, k * 64:(k + 1) * 64])
    out = torch.zeros(4, 2, 200, 3, 64, dtype=torch.bfloat16, device="cuda")
    outs = [out[:, :, 8 + k * 64:8 + (k + 1) * 64] for k in range(3)]
    assert codec.decode_many(batch, spec, 64, outs) == [None, None, None]
    assert torch.equal(_bits(out[:, :, 8:200].cpu()), _bits(ref))
    bad = batch[1].clone()
    bad[-20] ^= 0x55
    out.zero_()
    errors = codec.decode_many([batch[0], bad, batch[2]], spec, 64, outs)
    assert errors[0] is None and errors[2] is None and "corrupt" in errors[1]
    assert torch.equal(_bits(out[:, :, 8:72].cpu()), _bits(ref[:, :, :64]))
    assert torch.equal(_bits(out[:, :, 136:200].cpu()), _bits(ref[:, :, 128:]))


@pytest.mark.parametrize("nbytes,skew", [(2, 0), (4098, 0), (1 << 20, 0), ((1 << 21) + 6, 0), (10, 6), (30, 2),
                                         ((1 << 20) + 14, 10)])
def test_halfsum3_kernel_matches_its_definition(nbytes, skew):
    """Whole 16-byte loads, and words before the first 16-byte boundary (``skew``) and after the last load."""
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(nbytes))
    sums = torch.zeros(3, dtype=torch.int64, device="cuda")
    on_gpu = torch.empty(nbytes + skew, dtype=torch.uint8, device="cuda")[skew:]
    on_gpu.copy_(data)
    _cuda.halfsum3(on_gpu.view(torch.int16), 70000, sums)
    w = data.numpy().view("<u2").astype(np.int64)
    j = 70000 + np.arange(w.size, dtype=np.int64)
    want = [int(w.sum()), int((w * (j % 65521 + 1)).sum()), int((w * (j % 65519 + 1)).sum())]
    assert sums.tolist() == want


def _halfsum3_reference(data: torch.Tensor) -> list[int]:
    w = data.cpu().numpy().view("<u2").astype(np.int64)
    j = np.arange(w.size, dtype=np.int64)
    return [int(w.sum()), int((w * (j % 65521 + 1)).sum()), int((w * (j % 65519 + 1)).sum())]


@pytest.mark.parametrize("count", [7, 1000])  # 1000 rows: more than 4 blocks per SM, so one block per row
@pytest.mark.parametrize("spacing", [12288, 10004])  # rows 16-byte aligned (8 words per load), or not
def test_halfsum3_rows_sums_each_row_as_a_payload_of_its_own(count, spacing):
    """One launch over payloads evenly spaced in one buffer (a batched read) == each payload's own definition."""
    buf = torch.randint(0, 256, (count * spacing,), dtype=torch.uint8, device="cuda")
    payloads = [buf[r * spacing : r * spacing + 10002] for r in range(count)]  # 10002 bytes each
    rows = buf.view(torch.int16).view(count, -1)[:, :5001]
    sums = torch.zeros(count, 3, dtype=torch.int64, device="cuda")
    _cuda.halfsum3_rows(rows, sums)
    assert sums.tolist() == [_halfsum3_reference(p) for p in payloads]
    with pytest.raises(ValueError, match="contiguous rows"):
        _cuda.halfsum3_rows(rows.t(), sums)


def test_digests_of_a_batched_read_take_one_launch(monkeypatch):
    from gdscache.format import checksum

    buf = torch.randint(0, 256, (5 << 20,), dtype=torch.uint8, device="cuda")
    even = [buf[r << 20 : (r << 20) + 1000000] for r in range(5)]  # evenly spaced: one launch
    uneven = [buf[:4096], buf[8192:20000], buf[1 << 20 : 3 << 20]]  # per payload
    launches: dict[str, int] = {}

    def counted(name: str):
        real = getattr(_cuda, name)

        def launch(*args):
            launches[name] = launches.get(name, 0) + 1
            return real(*args)

        return launch

    for name in ("halfsum3_rows", "halfsum3"):
        monkeypatch.setattr(_cuda, name, counted(name))
    for payloads, want in ((even, {"halfsum3_rows": 1}), (uneven, {"halfsum3": 3})):
        launches.clear()
        got = checksum.digests(payloads, [checksum.HALFSUM3] * len(payloads))
        assert launches == want
        assert got == [checksum.halfsum3_digest([p.cpu()]) for p in payloads]  # the torch definition on the host


def test_raw_decode_of_a_batched_read_is_one_copy(monkeypatch):
    from gdscache.codecs.raw import RawCodec

    spec = KVSpec(4, 2, 3, 64, torch.bfloat16)
    kv = _kv(torch.bfloat16, tokens=64).cuda()
    chunk = spec.bytes_per_token() * 16
    buf = torch.zeros(4 * (chunk + 4096), dtype=torch.uint8, device="cuda")
    payloads = []
    for k in range(4):  # each chunk's payload 4 KiB-padded in one buffer, as LocalTier.read_many lays them out
        payload = buf[k * (chunk + 4096) : k * (chunk + 4096) + chunk]
        payload.copy_(kv[:, :, 16 * k : 16 * (k + 1)].contiguous().view(-1).view(torch.uint8))
        payloads.append(payload)
    codec = RawCodec()
    per_chunk = []
    monkeypatch.setattr(RawCodec, "decode", lambda self, *a: per_chunk.append(a) or None)
    out = torch.zeros_like(kv)
    assert codec.decode_many(payloads, spec, 16, [out[:, :, 16 * k : 16 * (k + 1)] for k in range(4)]) == [None] * 4
    assert per_chunk == [] and torch.equal(out, kv)
    out.zero_()  # not evenly spaced: chunk by chunk
    outs = [out[:, :, 16 * k : 16 * (k + 1)] for k in (0, 2, 3)]
    codec.decode_many([payloads[0], payloads[2], payloads[3]], spec, 16, outs)
    assert len(per_chunk) == 3


@pytest.mark.parametrize("layers, planes, heads", [(4, 2, 3), (1, 2, 2), (3, 1, 2), (1, 1, 1)])
def test_raw_decode_of_host_payloads_copies_rows_straight_into_out(monkeypatch, layers, planes, heads):
    # DRAM-tier hits: pinned host payloads land in token slices of a wider GPU ``out`` by 2-D copies, bit for bit
    # as the per-chunk torch copy (the reference) writes them, and nothing outside the slices is touched
    from gdscache.codecs.raw import RawCodec

    spec = KVSpec(layers, planes, heads, 64, torch.bfloat16)
    g = torch.Generator().manual_seed(layers * 10 + planes)
    kv = torch.randn(layers, planes, 64, heads, 64, generator=g).to(torch.bfloat16)
    payloads = [kv[:, :, 16 * k : 16 * (k + 1)].contiguous().view(-1).view(torch.uint8).pin_memory() for k in range(4)]
    codec = RawCodec()
    wide = torch.full((layers, planes, 80, heads, 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    outs = [wide[:, :, 8 + 16 * k : 8 + 16 * (k + 1)] for k in (2, 0, 3, 1)]  # any order, any spacing
    per_chunk = []
    decode = RawCodec.decode
    monkeypatch.setattr(RawCodec, "decode", lambda self, *a: per_chunk.append(a) or decode(self, *a))
    torch.cuda._sleep(200_000_000)  # the copies wait behind a few hundred ms of GPU time
    assert codec.decode_many([payloads[k] for k in (2, 0, 3, 1)], spec, 16, outs) == [None] * 4
    assert per_chunk == []  # no chunk took the torch path
    nbytes = payloads[0].numel()
    del payloads  # the copies still have to read them: they must be held, their memory not handed out again
    for _ in range(8):
        torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(0xFF)
    assert torch.equal(_bits(wide[:, :, 8:72].cpu()), _bits(kv))
    assert torch.isnan(wide[:, :, :8]).all() and torch.isnan(wide[:, :, 72:]).all()
    pages = KVPages(torch.zeros(layers, planes, 4, 16, heads, 64, dtype=torch.bfloat16, device="cuda"), [1, 0])
    codec.decode_many([kv[:, :, :32].contiguous().view(-1).view(torch.uint8)], spec, 32, [pages])
    assert len(per_chunk) == 1 and torch.equal(_bits(pages.gather().cpu()), _bits(kv[:, :, :32]))  # pages: torch


def test_raw_decode_run_places_host_payloads_by_out_strides():
    # a run of consecutive chunks' host payloads lands at out[:, :, start:], destinations reckoned from the strides
    from gdscache.codecs.raw import RawCodec

    spec = KVSpec(3, 2, 2, 64, torch.bfloat16)
    kv = _kv(torch.bfloat16, layers=3, tokens=64, heads=2)
    payloads = [kv[:, :, 16 * k : 16 * (k + 1)].contiguous().view(-1).view(torch.uint8).pin_memory() for k in range(4)]
    codec = RawCodec()
    wide = torch.full((3, 2, 100, 2, 64), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = wide[:, :, 10:90]  # 80 tokens: the run fills 16..80
    assert codec.decode_run(payloads, spec, 16, out, 16)
    assert torch.equal(_bits(wide[:, :, 26:90].cpu()), _bits(kv))
    assert torch.isnan(wide[:, :, :26]).all() and torch.isnan(wide[:, :, 90:]).all()
    assert not codec.decode_run(payloads, spec, 16, out, 32)  # would run past out's end: nothing written
    assert torch.isnan(wide[:, :, 90:]).all()
    assert not codec.decode_run(payloads[:1], spec, 8, out, 0)  # payloads of another length
    assert not codec.decode_run([p.cuda() for p in payloads], spec, 16, out, 0)  # not host payloads
    pages = KVPages(torch.zeros(3, 2, 4, 16, 2, 64, dtype=torch.bfloat16, device="cuda"), [1, 0])
    assert not codec.decode_run(payloads[:2], spec, 16, pages, 0)
    assert torch.isnan(wide[:, :, :26]).all()


def test_raw_host_copies_leave_rows_too_far_apart_to_torch():
    # a 2-D copy takes row pitches below 2 GiB: a slice of a 4 GiB KV tensor whose planes lie 2 GiB apart decodes by
    # torch's copy instead, bit-exact all the same
    from gdscache.codecs.raw import RawCodec

    spec = KVSpec(1, 2, 8, 128, torch.bfloat16)
    big = torch.zeros(1, 2, 1 << 20, 8, 128, dtype=torch.bfloat16, device="cuda")  # planes 2 GiB apart
    assert big.stride(1) * big.element_size() > _cuda.MAX_PITCH
    kv = torch.randn(1, 2, 32, 8, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    payloads = [kv[:, :, 16 * k : 16 * (k + 1)].contiguous().view(-1).view(torch.uint8).pin_memory() for k in range(2)]
    codec = RawCodec()
    assert not codec.decode_run(payloads, spec, 16, big, 0)
    assert not bool(big[:, :, :32].any())  # nothing written
    assert codec.decode_many(payloads, spec, 16, [big[:, :, :16], big[:, :, 16:32]]) == [None, None]
    assert torch.equal(_bits(big[:, :, :32].cpu()), _bits(kv))


def test_quantize_dequantize_kernels_match_reference():
    from gdscache.codecs import cachegen

    kv = _kv(torch.float16)
    sw = torch.linspace(0.02, 0.3, 4 * 2 * 192, dtype=torch.float32).view(4, 2, 192)
    ref = cachegen.quantize(kv, sw)
    got = cachegen.quantize(kv.cuda(), sw.cuda())
    for a, b in zip(ref, got, strict=True):
        assert torch.equal(a, b.cpu())
    out_ref, out_gpu = torch.empty_like(kv), torch.empty_like(kv, device="cuda")
    cachegen.dequantize(*ref, sw, out_ref)
    cachegen.dequantize(*got, sw.cuda(), out_gpu)
    assert torch.equal(_bits(out_gpu.cpu()), _bits(out_ref))


def _paged(kv, page_tokens, order, seed=1):
    """``kv [L, 2, T, H, D]`` placed into shuffled pages of a vLLM-like cache (``order``: "NHD" or "HND" within a
    page, K and V packed per token); returns the cache, its pages view and the page ids in token order."""
    layers, _, tokens, heads, dim = kv.shape
    n_pages = tokens // page_tokens + 5
    inner = (page_tokens, heads) if order == "NHD" else (heads, page_tokens)
    cache = torch.randn(layers, n_pages, *inner, 2 * dim, generator=torch.Generator().manual_seed(seed)).to(kv.dtype)
    cache = cache.to(kv.device)
    six = cache.unflatten(-1, (2, dim))  # [L, B, N, H, 2, D] or [L, B, H, N, 2, D]
    pages = six.permute(0, 4, 1, 2, 3, 5) if order == "NHD" else six.permute(0, 4, 1, 3, 2, 5)
    ids = torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed))[: tokens // page_tokens].tolist()
    KVPages(pages, ids).scatter(kv)
    return cache, pages, ids


@pytest.mark.parametrize("order", ["NHD", "HND"])
def test_cachegen_kernels_read_and_write_pages_in_place(order):
    codec = get_codec("cachegen")
    kv = torch.cat([_kv(torch.bfloat16, seed=s) for s in range(3)], dim=2).cuda()  # three 64-token chunks
    cache, pages, ids = _paged(kv, 16, order)
    paged = KVPages(pages, ids)
    chunks = [kv[:, :, k * 64:(k + 1) * 64] for k in range(3)]
    want = codec.encode_many(chunks)
    got = codec.encode_many([paged.tokens(k * 64, (k + 1) * 64) for k in range(3)])  # reads the pages in place
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    spec = KVSpec.of(kv)
    ref = torch.empty_like(kv)
    assert codec.decode_many(want, spec, 64, [ref[:, :, k * 64:(k + 1) * 64] for k in range(3)]) == [None] * 3
    # decode into other pages, the first 16-token page skipped (the engine already holds it)
    before = cache.clone()
    dest_ids = [-1] + ids[1:]
    dest = KVPages(pages, dest_ids)
    assert codec.decode_many(want, spec, 64, [dest.tokens(k * 64, (k + 1) * 64) for k in range(3)]) == [None] * 3
    assert torch.equal(_bits(KVPages(pages, ids[1:]).gather()), _bits(ref[:, :, 16:]))
    others = torch.ones(cache.shape[1], dtype=torch.bool)
    others[ids[1:]] = False
    assert torch.equal(_bits(cache[:, others]), _bits(before[:, others]))  # skipped and foreign pages untouched


def test_gdscache_stores_and_retrieves_pages_on_the_gpu(tmp_path):
    from gdscache import GDSCache

    kv = torch.cat([_kv(torch.bfloat16, seed=s) for s in range(4)], dim=2).cuda()
    _, pages, ids = _paged(kv, 16, "NHD")
    tokens = list(range(kv.shape[2]))
    with GDSCache(path=str(tmp_path), chunk_size=64, model_id="m", codec="cachegen") as cache:
        assert cache.store(tokens, KVPages(pages, ids)) == 256
        ref = torch.empty_like(kv)
        assert cache.retrieve(tokens, ref) == 256
        cache2_out = torch.zeros_like(pages)
        out = KVPages(cache2_out, [-1, -1] + ids[2:])
        assert cache.retrieve(tokens, out) == 256
        assert torch.equal(_bits(KVPages(cache2_out, ids[2:]).gather()), _bits(ref[:, :, 32:]))
        assert not bool(cache2_out[:, :, [i for i in range(pages.shape[2]) if i not in ids[2:]]].any())


def test_digests_of_gpu_payloads_share_one_sync_and_match_the_reference():
    from gdscache.format import checksum

    host = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
            for n in (1 << 20, 4096 + 2, 7, 70000)]
    algs = [checksum.HALFSUM3] * 4
    want = [checksum.digest(p, a) for p, a in zip(host, algs)]  # the torch reference, on the CPU
    assert checksum.digests([p.cuda() for p in host], algs) == want
