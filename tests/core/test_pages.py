"""KVPages: an engine's paged KV stored from and retrieved into in place, through every codec (CPU paths)."""

from __future__ import annotations

import tempfile

import pytest
import torch

from gdscache import GDSCache, KVPages

L, H, D, N, PAGES = 2, 2, 8, 16, 12  # layers, kv heads, head_dim, tokens per page, pages in the cache


def _cache(dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """A vLLM-like cache [L, pages, N, H, 2D] (K and V packed per token) and its [L, 2, pages, N, H, D] view."""
    buf = torch.randn(L, PAGES, N, H, 2 * D, generator=torch.Generator().manual_seed(0)).to(dtype)
    return buf, buf.unflatten(-1, (2, D)).permute(0, 4, 1, 2, 3, 5)


def test_gather_and_scatter_follow_the_page_ids() -> None:
    buf, pages = _cache(torch.float32)
    kv = KVPages(pages, [7, 2, 9]).gather()
    assert kv.shape == (L, 2, 3 * N, H, D)
    assert torch.equal(kv[1, 1, N + 3, 0], buf[1, 2, 3, 0, D:])  # token 3 of page 2: V of head 0
    new = torch.randn(L, 2, 3 * N, H, D)
    before = buf.clone()
    KVPages(pages, [4, -1, 11]).scatter(new)
    assert torch.equal(KVPages(pages, [4, 11]).gather(), torch.cat([new[:, :, :N], new[:, :, 2 * N:]], dim=2))
    assert torch.equal(buf[:, [p for p in range(PAGES) if p not in (4, 11)]],
                       before[:, [p for p in range(PAGES) if p not in (4, 11)]])


def test_bad_pages_are_clear_errors() -> None:
    _, pages = _cache()
    with pytest.raises(ValueError, match="6-dim"):
        KVPages(pages[0], [0])
    with pytest.raises(ValueError, match=r"in \[0, 12\)"):
        KVPages(pages, [0, 12])
    with pytest.raises(ValueError, match="twice"):
        KVPages(pages, [3, 3])
    with pytest.raises(ValueError, match="ints"):
        KVPages(pages, [0.5])
    with pytest.raises(ValueError, match="whole pages"):
        KVPages(pages, [0, 1]).tokens(0, N + 1)
    with pytest.raises(ValueError, match="skipped"):
        KVPages(pages, [0, -1]).gather()
    with pytest.raises(ValueError, match="shape"):
        KVPages(pages, [0]).scatter(torch.zeros(L, 2, N + 1, H, D))


@pytest.mark.parametrize("codec", ["raw", "lossless", "cachegen"])
def test_store_and_retrieve_pages(codec: str, tmp_path) -> None:
    buf, pages = _cache()
    tokens = list(range(4 * N))
    src = KVPages(pages, [3, 8, 0, 5])
    with GDSCache(path=str(tmp_path), chunk_size=2 * N, model_id="m", codec=codec) as cache:
        assert cache.store(tokens, src) == 4 * N
        want = torch.empty(src.shape, dtype=src.dtype)
        assert cache.retrieve(tokens, want) == 4 * N
        if codec != "cachegen":
            assert torch.equal(want, src.gather())
        before = buf.clone()
        dest = KVPages(pages, [-1, 1, 2, 4])  # the first page is the engine's own: left alone
        assert cache.retrieve(tokens, dest) == 4 * N
        assert torch.equal(KVPages(pages, [1, 2, 4]).gather(), want[:, :, N:])
        untouched = [p for p in range(PAGES) if p not in (1, 2, 4)]
        assert torch.equal(buf[:, untouched], before[:, untouched])


def test_store_and_retrieve_reject_unfit_pages(tmp_path) -> None:
    _, pages = _cache()
    with (GDSCache(path=str(tmp_path), chunk_size=24, model_id="m") as cache,
          pytest.raises(ValueError, match="whole number of 16-token pages")):
        cache.store(list(range(2 * N)), KVPages(pages, [0, 1]))
    with (GDSCache(path=str(tmp_path / "b"), chunk_size=N, model_id="m") as cache,
          pytest.raises(ValueError, match="skipped pages")):
        cache.store(list(range(2 * N)), KVPages(pages, [0, -1]))


def test_stacked_view_of_consecutive_token_slices() -> None:
    from gdscache.pages import stacked_view, token_slice

    kv = torch.randn(3, 2, 40, 2, 4)
    chunks = [token_slice(kv, 8 * k, 8 * (k + 1)) for k in range(1, 5)]
    view = stacked_view(chunks)
    assert view is not None and view.shape == (4, 3, 2, 8, 2, 4)
    assert torch.equal(view, torch.stack(chunks))
    assert view.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()  # a view, no copy
    assert torch.equal(stacked_view(chunks[:1]), chunks[0].unsqueeze(0))
    assert stacked_view([]) is None
    assert stacked_view(chunks[::-1]) is None  # descending starts
    assert stacked_view([chunks[0], chunks[1], chunks[3]]) is None  # a gap
    assert stacked_view([chunks[0], token_slice(kv.clone(), 16, 24)]) is None  # another tensor
    assert stacked_view([chunks[0], token_slice(kv, 8, 15)]) is None  # another shape


def test_rows_are_a_tensors_rows_made_when_asked_for() -> None:
    from gdscache.pages import stacked_view
    from io_backends.base import Rows

    stack = torch.arange(24).view(6, 4)
    rows = Rows(stack)
    assert len(rows) == 6 and stacked_view(rows) is stack  # the stack itself: nothing checked, nothing made
    assert torch.equal(rows[1], stack[1]) and torch.equal(rows[-1], stack[5])
    assert [r.tolist() for r in rows] == stack.tolist()
    part = rows[2:5]
    assert isinstance(part, Rows) and len(part) == 3 and torch.equal(part.stack, stack[2:5])
    assert part.stack.data_ptr() == stack[2].data_ptr()  # a view
    assert len(rows[5:2]) == 0 and len(rows[-2:]) == 2 and stacked_view(rows[3:3]) is None  # as stacked_view([])
    assert [r.tolist() for r in rows[::2]] == stack[::2].tolist()
    with pytest.raises(IndexError):
        rows[6]
    with pytest.raises(ValueError, match="one dimension"):
        Rows(torch.tensor(1))


def test_chunk_views_are_the_token_slices() -> None:
    from gdscache.pages import stacked_view, token_slice

    kv = torch.randn(3, 2, 40, 2, 4)
    with tempfile.TemporaryDirectory() as root, GDSCache(path=root, chunk_size=8, model_id="m") as cache:
        views = cache._chunk_views(kv, 1, 3)
    assert len(views) == 3
    for k, view in enumerate(views):
        expected = token_slice(kv, 8 * (k + 1), 8 * (k + 2))
        assert view.shape == expected.shape and view.stride() == expected.stride()
        assert view.data_ptr() == expected.data_ptr()
    assert torch.equal(stacked_view(views), stacked_view([token_slice(kv, 8 * k, 8 * (k + 1)) for k in (1, 2, 3)]))
