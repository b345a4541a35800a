"""Config sources and key derivation."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from gdscache import Config, GDSCache, KVSpec
from gdscache.config import NOT_FIELDS, parse_size
from gdscache.keys import ChunkKeys, as_token_array, chunk_keys, fingerprint, namespace_of


def test_yaml_with_env_overrides(tmp_path, monkeypatch):
    f = tmp_path / "gdscache.yaml"
    f.write_text(f"path: {tmp_path / 'kv'}\nchunk_size: 128\nmax_disk_bytes: 2GiB\ncodec_params: {{}}\n")
    monkeypatch.setenv("GDSCACHE_CHUNK_SIZE", "64")
    monkeypatch.setenv("GDSCACHE_REMOTE_OPTIONS", '{"endpoint_url": "http://127.0.0.1:9"}')
    cfg = Config.from_yaml(f)
    assert cfg.chunk_size == 64 and cfg.max_disk_bytes == 2 * 2**30
    assert cfg.remote_options == {"endpoint_url": "http://127.0.0.1:9"}
    monkeypatch.setenv("GDSCACHE_NOT_A_FIELD", "1")
    with pytest.raises(ValueError, match="GDSCACHE_NOT_A_FIELD names no config field"):
        Config.from_yaml(f)


@pytest.mark.parametrize("name", sorted(NOT_FIELDS))
def test_variables_for_libraries_are_not_config_fields(tmp_path, monkeypatch, name):
    """The variables that steer the native libraries (GDSCACHE_NO_KERNELS=1, GDSCACHE_IO_LIB=...) leave the config
    alone."""
    monkeypatch.setenv(name, "1")
    assert Config.build({"path": str(tmp_path)}).path == str(tmp_path)


def test_yaml_must_be_a_mapping(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        Config.from_yaml(f)


def test_keyword_fields_and_config_object_agree(tmp_path):
    a = GDSCache(path=str(tmp_path), chunk_size=32, model_id="x")
    b = GDSCache(Config(path=str(tmp_path), chunk_size=32, model_id="x"))
    assert a.config == b.config
    with pytest.raises(TypeError, match="either a Config or keyword"):
        GDSCache(Config(path=str(tmp_path)), chunk_size=4)
    a.close(), b.close()


@pytest.mark.parametrize("text, value", [("512", 512), ("4KiB", 4096), ("1.5 GB", 1_500_000_000), ("2gib", 2 * 2**30)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_key_chain_matches_its_definition():
    spec = KVSpec(2, 2, 4, 8, torch.bfloat16)
    fp = fingerprint(model_id="m", spec=spec, layout="LPTHD", tp_rank=0, tp_size=1, chunk_size=4, codec="raw",
                     codec_params={})
    ns = namespace_of(fp)
    tokens = as_token_array(list(range(10)))
    keys = chunk_keys(ns, tokens, 4)
    assert len(keys) == 2  # the partial third chunk has no key
    k0 = hashlib.blake2b(ns, digest_size=16, person=b"gdscache-kv")
    k0.update(np.arange(4, dtype="<u4").tobytes())
    assert keys[0] == k0.digest()
    k1 = hashlib.blake2b(keys[0], digest_size=16, person=b"gdscache-kv")
    k1.update(np.arange(4, 8, dtype="<u4").tobytes())
    assert keys[1] == k1.digest()


def test_keys_stay_what_they_were():
    """Keys are persistent: one written by this version must be found by the next, on every host. A change to the
    scheme must be deliberate (``KEY_SCHEME`` raised, which moves every key to a new namespace), never a side effect."""
    spec = KVSpec(2, 2, 4, 8, torch.bfloat16)
    fp = fingerprint(model_id="m", spec=spec, layout="LPTHD", tp_rank=0, tp_size=1, chunk_size=4, codec="raw",
                     codec_params={})
    assert fp["key_scheme"] == 2
    ns = namespace_of(fp)
    assert ns.hex() == "5f6dbe88fb6db0c3eb5da54a91b4ac0b"
    assert [k.hex() for k in chunk_keys(ns, as_token_array(np.arange(10, dtype=np.int64)), 4)] == [
        "b8f82e9abe681fc8052a0e08b1424d4d", "06042f9e96902b5998661a6bfa88bc4d"]
    with pytest.raises(TypeError, match="<u4"):  # token ids of another width would give other keys
        chunk_keys(ns, np.arange(10, dtype=np.int64), 4)


def test_keys_hashed_as_asked_for_are_the_chain_s():
    """ChunkKeys gives chunk_keys' values however it is read, first read included: by index (negative too), slice
    (negative bounds and steps too), iteration."""
    ns, tokens = b"n" * 16, as_token_array(list(range(1000)))
    want = chunk_keys(ns, tokens, 16)
    assert len(want) == 62
    for read in (lambda k: [k[i] for i in range(62)], lambda k: [*k[5:9], *k[40:41]] and k[:5] + k[5:9] + k[9:],
                 lambda k: list(k), lambda k: [k[-1 - i] for i in range(62)][::-1], lambda k: k[::-1][::-1],
                 lambda k: [k[40], *k][1:], lambda k: [k[-61], *k[:-61], *k[1:]][1:], lambda k: [*k[:-1], k[61]],
                 lambda k: (k[-3:-1] + k[-2::-1])[2:][::-1] + k[-1:]):
        assert read(ChunkKeys(ns, tokens, 16)) == want
    with pytest.raises(IndexError):
        ChunkKeys(ns, tokens, 16)[62]


def test_a_spec_from_a_tensor_and_from_a_header_is_one_object():
    """KVSpec.of and KVSpec.from_json give one object per distinct spec (a retrieve compares a chunk's spec with the
    request's by identity first); a spec built directly is still equal to it."""
    kv = torch.zeros(2, 2, 8, 4, 16, dtype=torch.bfloat16)
    spec = KVSpec.of(kv)
    assert KVSpec.from_json(spec.to_json()) is spec and KVSpec.of(kv.clone()) is spec
    direct = KVSpec(2, 2, 4, 16, torch.bfloat16)
    assert direct == spec and direct is not spec and KVSpec.of(kv.float()) != spec


def test_every_fingerprint_field_changes_the_namespace():
    spec = KVSpec(2, 2, 4, 8, torch.bfloat16)
    base = dict(model_id="m", spec=spec, layout="L", tp_rank=0, tp_size=2, chunk_size=4, codec="raw", codec_params={})
    variants = [
        dict(model_id="m2"), dict(spec=KVSpec(2, 2, 4, 8, torch.float16)), dict(spec=KVSpec(3, 2, 4, 8, torch.bfloat16)),
        dict(spec=KVSpec(2, 1, 4, 8, torch.bfloat16)), dict(layout="K"), dict(tp_rank=1), dict(tp_size=4),
        dict(chunk_size=8), dict(codec="cachegen"), dict(codec_params={"bits": 4}),
    ]
    namespaces = {namespace_of(fingerprint(**base))} | {namespace_of(fingerprint(**{**base, **v})) for v in variants}
    assert len(namespaces) == len(variants) + 1
