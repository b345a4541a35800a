"""Moving KV between vLLM's paged cache and gdscache's ``[layers, 2, tokens, heads, head_dim]`` tensors.

vLLM 0.32 gives every attention layer a logical ``[blocks, heads, block_tokens, content]`` view
whose physical order follows the resolved ``KVCacheLayout``; all layers live in one allocation.
What ``content`` holds depends on the attention backend:

- ``kv_packed`` (FLASH_ATTN, TRITON_ATTN, FLEX_ATTENTION, FLASHINFER): per (block, head, token),
  ``content = [K(head_dim), V(head_dim)]``. Chunks are stored in true canonical order, so any
  physical layout (NHD, HND, block-outermost) shares them: the layout name is ``LPTHD``.
- ``cpu_blocked`` (CPU_ATTN): per (block, head), ``block_tokens`` rows of K in the kernel's own
  (ISA-specific, transposed) order, then ``block_tokens`` rows of V. The K rows are copied bit
  for bit; the layout name carries the ISA and block size so only an identical engine reads them.

A chunk is always a whole number of blocks. When the layers share one strided allocation (vLLM
0.32 always does) a request's blocks are handed to gdscache as :class:`gdscache.KVPages`: the
cachegen kernels read and write them in place, other codecs run one indexing kernel over all
layers; otherwise the blocks are gathered and scattered one layer at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from gdscache.pages import SKIP, KVPages, stacked_view

Packing = Literal["kv_packed", "cpu_blocked"]

KV_PACKED_BACKENDS = frozenset({"FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION", "FLASHINFER"})
CPU_BLOCKED_BACKENDS = frozenset({"CPU_ATTN"})
CANONICAL_LAYOUT = "LPTHD"


def packing_of_backend(backend_name: str) -> Packing:
    """The content packing of a vLLM attention backend; a clear error for one gdscache cannot read."""
    if backend_name in KV_PACKED_BACKENDS:
        return "kv_packed"
    if backend_name in CPU_BLOCKED_BACKENDS:
        return "cpu_blocked"
    known = ", ".join(sorted(KV_PACKED_BACKENDS | CPU_BLOCKED_BACKENDS))
    raise ValueError(
        f"gdscache cannot read the KV cache of vLLM attention backend {backend_name!r}; supported backends: {known}"
    )


def layout_name(packing: Packing, *, isa: str | None = None, block_size: int | None = None) -> str:
    """The ``Config.layout`` string: part of every key, so chunks never mix across page encodings."""
    if packing == "kv_packed":
        return CANONICAL_LAYOUT
    if packing == "cpu_blocked":
        if not isa or not block_size:
            raise ValueError("the cpu_blocked layout needs the CPU attention ISA and the block size")
        return f"vllm-cpu-{isa}-bs{block_size}"
    raise ValueError(f"unknown KV packing {packing!r}; expected 'kv_packed' or 'cpu_blocked'")


@dataclass(frozen=True)
class PageFormat:
    """What one layer's paged view holds."""

    packing: Packing
    num_kv_heads: int
    head_size: int
    block_size: int  # tokens per scheduler (manager) block


class PagedKV:
    """vLLM's paged cache as gdscache :class:`KVPages`: one request's blocks, stored from and loaded into in place."""

    def __init__(self, views: Sequence[torch.Tensor], fmt: PageFormat, num_blocks: int) -> None:
        if not views:
            raise ValueError("PagedKV needs at least one layer's KV cache view")
        first = views[0]
        if first.dim() != 4:
            raise ValueError(f"expected [blocks, heads, block_tokens, content] layer views, got shape {tuple(first.shape)}")
        blocks, heads, tokens, content = first.shape
        if heads != fmt.num_kv_heads or content != 2 * fmt.head_size:
            raise ValueError(
                f"KV cache view shape {tuple(first.shape)} does not match {fmt.num_kv_heads} KV heads with "
                f"K and V of {fmt.head_size} elements each (content {2 * fmt.head_size})"
            )
        if blocks % num_blocks or tokens * (blocks // num_blocks) != fmt.block_size:
            raise ValueError(
                f"KV cache view has {blocks} blocks of {tokens} tokens; expected {num_blocks} blocks of "
                f"{fmt.block_size} tokens (or an even split of them)"
            )
        self.fmt = fmt
        self.views = list(views)
        self.stacked = stacked_view(self.views)  # one [L, B, H, N, C] view, or None: a copy per layer
        # one [L, 2, blocks, tokens, H, D] view over all layers, or one per layer when they are not one allocation
        self.layer_pages = [self._pages_view(v) for v in ([self.stacked] if self.stacked is not None
                                                            else [v.unsqueeze(0) for v in self.views])]
        self.split = blocks // num_blocks  # kernel blocks per scheduler block
        self.device = first.device
        self.dtype = first.dtype

    @property
    def num_layers(self) -> int:
        return len(self.views)

    def _pages_view(self, stacked: torch.Tensor) -> torch.Tensor:
        """``[L, B, H, N, C]`` -> a ``[L, 2, B, N, H, D]`` view of the same memory."""
        layers, blocks, heads, n, content = stacked.shape
        d = self.fmt.head_size
        if self.fmt.packing == "kv_packed":
            return stacked.unflatten(-1, (2, d)).permute(0, 4, 1, 3, 2, 5)
        s_layer, s_block, s_head, s_token, s_elem = stacked.stride()
        if s_token != content * s_elem:
            raise ValueError("cpu_blocked KV pages must keep each (block, head) page contiguous")
        return stacked.as_strided((layers, 2, blocks, n, heads, d),
                                  (s_layer, n * d * s_elem, s_block, d * s_elem, s_head, s_elem),
                                  stacked.storage_offset())

    def _kernel_ids(self, block_ids: Sequence[int], skip_blocks: int = 0) -> np.ndarray:
        ids = np.asarray(block_ids, dtype=np.int64)
        ids = (ids[:, None] * self.split + np.arange(self.split)).reshape(-1)
        ids[: skip_blocks * self.split] = SKIP
        return ids

    def pages(self, block_ids: Sequence[int], skip_blocks: int = 0) -> KVPages | None:
        """The blocks ``block_ids`` (in token order) as pages gdscache reads and writes in place; the first
        ``skip_blocks`` are left alone on retrieve. None when the layers are not one allocation."""
        if self.stacked is None:
            return None
        return KVPages(self.layer_pages[0], self._kernel_ids(block_ids, skip_blocks))

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """KV of ``block_ids`` (in token order) as a new ``[L, 2, len(block_ids)*block_size, H, D]`` tensor."""
        ids = self._kernel_ids(block_ids)
        parts = [KVPages(pages, ids).gather() for pages in self.layer_pages]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def scatter(self, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        """Write ``kv`` ``[L, 2, len(block_ids)*block_size, H, D]`` into the blocks ``block_ids``."""
        expected = (self.num_layers, 2, len(block_ids) * self.fmt.block_size, self.fmt.num_kv_heads, self.fmt.head_size)
        if tuple(kv.shape) != expected:
            raise ValueError(f"scatter got KV of shape {tuple(kv.shape)}, expected {expected}")
        ids = self._kernel_ids(block_ids)
        for layer, pages in enumerate(self.layer_pages):
            KVPages(pages, ids).scatter(kv if len(self.layer_pages) == 1 else kv[layer : layer + 1])
