"""``lossless``: bit-exact for every supported dtype, self-describing header, malformed input."""


import pytest
import torch

from gdscache.codecs import get_codec
from gdscache.codecs.lossless import _HEADER, MAGIC
from gdscache.spec import FLOAT_DTYPES, KVSpec


def _kv(dtype: torch.dtype, tokens: int = 24, heads: int = 2, dim: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, tokens, heads, dim, generator=g) * torch.logspace(-3, 2, dim)
    if dtype.itemsize >= 2:
        x[0, 0, 0, 0, :4] = torch.tensor([float("inf"), float("-inf"), -0.0, 1e-42 if dtype == torch.float32 else 0.0])
        x[0, 0, 1, 0, 0] = float("nan")
    return x.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("name", list(FLOAT_DTYPES))
def test_bit_exact(name):
    kv = _kv(FLOAT_DTYPES[name])
    codec = get_codec("lossless")
    payload = codec.encode(kv)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    out = torch.empty_like(kv)
    codec.decode(payload, KVSpec.of(kv), kv.shape[2], out)
    assert torch.equal(_bits(out), _bits(kv))


def test_compresses_bf16_and_decodes_into_strided_out():
    kv = torch.randn(4, 2, 64, 2, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    codec = get_codec("lossless")
    payload = codec.encode(kv)
    assert kv.numel() * 2 / payload.numel() > 1.25  # ~2.7 exponent bits + 8 sign/mantissa bits per value
    big = torch.zeros(4, 2, 100, 2, 32, dtype=torch.bfloat16)
    out = big[:, :, 10:74]
    codec.decode(payload, KVSpec.of(kv), 64, out)
    assert torch.equal(_bits(out), _bits(kv)) and not big[:, :, :10].any() and not big[:, :, 74:].any()


def test_header_is_self_describing_and_payload_is_new():
    kv = _kv(torch.float16)
    payload = get_codec("lossless").encode(kv)
    magic, version, planes, layers, tokens, heads, dim, group, nbytes, _ = _HEADER.unpack(payload[:_HEADER.size].numpy().tobytes())
    assert (magic, version, layers, planes, tokens, heads, dim, group, nbytes) == (MAGIC, 1, 3, 2, 24, 2, 16, 8, 2)
    assert payload.untyped_storage().data_ptr() != kv.untyped_storage().data_ptr()
    assert get_codec("lossless").params() == {"version": 1, "group": 8}


def test_malformed_payloads_raise_value_error():
    kv = _kv(torch.bfloat16)
    codec, spec = get_codec("lossless"), KVSpec.of(kv)
    payload = codec.encode(kv)
    out = torch.empty_like(kv)
    cases = {
        "truncated": payload[:-3],
        "tiny": payload[:5],
        "bad magic": torch.cat([torch.frombuffer(bytearray(b"XXXX"), dtype=torch.uint8), payload[4:]]),
        "flipped word": payload.clone().index_put_((torch.tensor([payload.numel() - 7]),), torch.tensor(0x5A, dtype=torch.uint8)),
        "bad table": payload.clone().index_put_((torch.tensor([_HEADER.size + 1]),), torch.tensor(0x77, dtype=torch.uint8)),
    }
    for why, bad in cases.items():
        with pytest.raises(ValueError):
            codec.decode(bad, spec, kv.shape[2], out)
    with pytest.raises(ValueError, match="holds KV"):
        codec.decode(payload, KVSpec(3, 2, 2, 16, torch.bfloat16), 23, torch.empty(3, 2, 23, 2, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="another dtype"):
        codec.decode(payload, KVSpec(3, 2, 2, 16, torch.float16), 24, torch.empty_like(kv, dtype=torch.float16))


def test_constant_chunk():
    kv = torch.full((1, 2, 8, 1, 8), 1.5, dtype=torch.bfloat16)
    codec = get_codec("lossless")
    out = torch.empty_like(kv)
    codec.decode(codec.encode(kv), KVSpec.of(kv), 8, out)
    assert torch.equal(out, kv)


def test_rejects_bad_group():
    with pytest.raises(ValueError, match="group"):
        get_codec("lossless", group=3)


def test_raw_rows_describe_only_layouts_a_2d_copy_can_fill():
    """``raw``'s host-to-GPU copy writes ``[layer, plane]`` rows of ``out``: evenly spaced, each contiguous."""
    from gdscache.codecs.raw import _rows

    wide = torch.zeros(4, 2, 100, 3, 8, dtype=torch.bfloat16)
    assert _rows(wide[:, :, 10:26]) == (8, 16 * 3 * 8 * 2, 100 * 3 * 8 * 2)
    assert _rows(wide[:1, :, 10:26]) == (2, 16 * 3 * 8 * 2, 100 * 3 * 8 * 2)
    assert _rows(wide[:, :1, 10:26]) == (4, 16 * 3 * 8 * 2, 2 * 100 * 3 * 8 * 2)
    assert _rows(wide[:1, :1, 10:26]) == (1, 16 * 3 * 8 * 2, 16 * 3 * 8 * 2)
    assert _rows(wide[:, :, :, :2]) is None  # heads cut: a row is not contiguous
    assert _rows(wide[:, :, 10:26, :, :4]) is None
    assert _rows(wide.permute(1, 0, 2, 3, 4)[:, :, 10:26]) is None  # planes outside layers: not evenly spaced
    assert _rows(torch.zeros(2, 2, 1, 3, 8).expand(2, 2, 4, 3, 8)) is None  # tokens broadcast
    assert _rows(torch.zeros(1, 8, 3, 8).expand(2, 2, 8, 3, 8)) is None  # rows overlap
