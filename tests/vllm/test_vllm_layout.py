"""PagedKV against hand-built vLLM 0.32 paged caches (no vLLM needed)."""

from __future__ import annotations

import pytest
import torch

from gdscache.integrations.vllm.layout import (
    CANONICAL_LAYOUT,
    PagedKV,
    PageFormat,
    layout_name,
    packing_of_backend,
)
from gdscache.pages import stacked_view

L, B, H, N, D = 3, 6, 2, 4, 8  # layers, blocks, kv heads, tokens per block, head_dim


def physical(order: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A backing tensor in physical ``order`` and its per-layer logical [B, H, N, C] views."""
    sizes = {"L": L, "B": B, "H": H, "N": N, "C": 2 * D}
    buf = torch.randn([sizes[a] for a in order])
    logical = buf.permute([order.index(a) for a in "LBHNC"])
    return buf, [logical[layer] for layer in range(L)]


def expected_kv(views: list[torch.Tensor], block_ids: list[int], packing: str) -> torch.Tensor:
    """The canonical [L, 2, T, H, D] tensor, built element by element from the views."""
    out = torch.empty(L, 2, len(block_ids) * N, H, D)
    for layer, view in enumerate(views):
        for i, b in enumerate(block_ids):
            for h in range(H):
                page = view[b, h]  # [N, 2D]
                if packing == "kv_packed":
                    k, v = page[:, :D], page[:, D:]
                else:  # N rows of K then N rows of V in the same [2N, D] region
                    rows = page.reshape(2 * N, D)
                    k, v = rows[:N], rows[N:]
                out[layer, 0, i * N : (i + 1) * N, h] = k
                out[layer, 1, i * N : (i + 1) * N, h] = v
    return out


ORDERS = {  # cpu_blocked pages keep each (block, head) page of N rows of K then N rows of V contiguous
    "kv_packed": ["LBHNC", "LBNHC", "BLNHC", "BLHNC"],
    "cpu_blocked": ["LBHNC", "BLHNC"],
}


@pytest.mark.parametrize(("packing", "order"), [(p, o) for p, orders in ORDERS.items() for o in orders])
def test_gather_matches_elementwise_reference(order: str, packing: str) -> None:
    _, views = physical(order)
    pager = PagedKV(views, PageFormat(packing, H, D, N), num_blocks=B)
    assert pager.stacked is not None  # one allocation: one kernel for all layers
    blocks = [4, 1, 3]
    assert torch.equal(pager.gather(blocks), expected_kv(views, blocks, packing))


@pytest.mark.parametrize("packing", ["kv_packed", "cpu_blocked"])
def test_scatter_writes_only_the_given_blocks(packing: str) -> None:
    buf, views = physical("LBNHC" if packing == "kv_packed" else "LBHNC")
    before = buf.clone()
    pager = PagedKV(views, PageFormat(packing, H, D, N), num_blocks=B)
    kv = torch.randn(L, 2, 2 * N, H, D)
    pager.scatter([5, 2], kv)
    assert torch.equal(pager.gather([5, 2]), kv)
    untouched = [b for b in range(B) if b not in (5, 2)]
    assert torch.equal(buf[:, untouched], before[:, untouched])


def test_separate_layer_tensors_fall_back_to_per_layer_copies() -> None:
    views = [torch.randn(B, H, N, 2 * D) for _ in range(L)]
    assert stacked_view(views) is None
    pager = PagedKV(views, PageFormat("kv_packed", H, D, N), num_blocks=B)
    kv = torch.randn(L, 2, N, H, D)
    pager.scatter([0], kv)
    assert torch.equal(pager.gather([0]), kv)
    assert torch.equal(pager.gather([2]), expected_kv(views, [2], "kv_packed"))


def test_kernel_blocks_smaller_than_scheduler_blocks() -> None:
    # 6 kernel blocks of 4 tokens = 3 scheduler blocks of 8 tokens
    _, views = physical("LBHNC")
    pager = PagedKV(views, PageFormat("kv_packed", H, D, 2 * N), num_blocks=B // 2)
    assert pager.split == 2
    assert torch.equal(pager.gather([2]), expected_kv(views, [4, 5], "kv_packed"))


def test_scatter_converts_dtype_to_the_cache() -> None:
    views = [v.to(torch.bfloat16) for v in physical("LBHNC")[1]]
    pager = PagedKV(views, PageFormat("kv_packed", H, D, N), num_blocks=B)
    kv = torch.randn(L, 2, N, H, D)
    pager.scatter([1], kv)
    assert torch.equal(pager.gather([1]), kv.to(torch.bfloat16))


def test_bad_shapes_and_backends_are_clear_errors() -> None:
    _, views = physical("LBHNC")
    with pytest.raises(ValueError, match="KV heads"):
        PagedKV(views, PageFormat("kv_packed", H + 1, D, N), num_blocks=B)
    with pytest.raises(ValueError, match="blocks of"):
        PagedKV(views, PageFormat("kv_packed", H, D, N), num_blocks=B + 1)
    pager = PagedKV(views, PageFormat("kv_packed", H, D, N), num_blocks=B)
    with pytest.raises(ValueError, match="expected"):
        pager.scatter([0], torch.zeros(L, 2, N + 1, H, D))
    with pytest.raises(ValueError, match="contiguous"):
        PagedKV(physical("LBNHC")[1], PageFormat("cpu_blocked", H, D, N), num_blocks=B)
    with pytest.raises(ValueError, match="MYSTERY_ATTN"):
        packing_of_backend("MYSTERY_ATTN")
    assert packing_of_backend("CPU_ATTN") == "cpu_blocked"
    assert packing_of_backend("FLASH_ATTN") == "kv_packed"


def test_layout_names_separate_page_encodings() -> None:
    assert layout_name("kv_packed") == CANONICAL_LAYOUT
    assert layout_name("cpu_blocked", isa="amx", block_size=32) != layout_name("cpu_blocked", isa="vec", block_size=32)
    with pytest.raises(ValueError, match="ISA"):
        layout_name("cpu_blocked")


@pytest.mark.parametrize("packing", ["kv_packed", "cpu_blocked"])
def test_pages_address_the_blocks_in_place(packing: str) -> None:
    buf, views = physical(ORDERS[packing][0])
    pager = PagedKV(views, PageFormat(packing, H, D, N), num_blocks=B)
    pages = pager.pages([4, 1, 3], skip_blocks=1)
    assert pages is not None and pages.shape == (L, 2, 3 * N, H, D)
    assert pages.pages.data_ptr() == buf.data_ptr()  # a view of vLLM's cache, not a copy
    assert list(pages.page_ids) == [-1, 1, 3]
    kv = torch.randn(L, 2, 3 * N, H, D)
    before = buf.clone()
    pages.scatter(kv)  # the skipped block 4 keeps its KV
    assert torch.equal(pager.gather([1, 3]), kv[:, :, N:])
    assert torch.equal(pager.gather([4]), expected_kv(views, [4], packing)) and torch.equal(buf[:, 4], before[:, 4])
    assert torch.equal(pager.pages([4, 1, 3]).gather(), pager.gather([4, 1, 3]))


def test_no_pages_for_separate_layer_tensors() -> None:
    views = [torch.randn(B, H, N, 2 * D) for _ in range(L)]
    assert PagedKV(views, PageFormat("kv_packed", H, D, N), num_blocks=B).pages([0]) is None
