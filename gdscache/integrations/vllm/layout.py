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

A chunk is always a whole number of blocks. Gather and scatter run one indexing kernel over all
layers and all blocks of a request when the layers share one strided allocation, which vLLM
0.32 always does; otherwise one per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

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


def stack_layers(views: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One ``[L, B, H, N, C]`` view over per-layer ``[B, H, N, C]`` views of one allocation, or None.

    None when the layers are not evenly spaced in one storage with equal strides (then callers
    fall back to one copy per layer).
    """
    first = views[0]
    if len(views) == 1:
        return first.unsqueeze(0)
    step = views[1].storage_offset() - first.storage_offset()
    base = first.untyped_storage().data_ptr()
    for i, view in enumerate(views):
        if (
            view.shape != first.shape
            or view.stride() != first.stride()
            or view.dtype != first.dtype
            or view.untyped_storage().data_ptr() != base
            or view.storage_offset() != first.storage_offset() + i * step
        ):
            return None
    if step <= 0:
        return None
    return torch.as_strided(first, (len(views), *first.shape), (step, *first.stride()), first.storage_offset())


class PagedKV:
    """Gather whole blocks of a paged cache into ``[L, 2, T, H, D]`` and scatter them back."""

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
        self.stacked = stack_layers(self.views)
        self.split = blocks // num_blocks  # kernel blocks per scheduler block
        self.kernel_tokens = tokens
        self.device = first.device
        self.dtype = first.dtype

    @property
    def num_layers(self) -> int:
        return len(self.views)

    def _kernel_ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.as_tensor(list(block_ids), dtype=torch.long)
        if self.split > 1:
            ids = (ids[:, None] * self.split + torch.arange(self.split)).flatten()
        return ids.to(self.device, non_blocking=True)

    def _to_canonical(self, pages: torch.Tensor) -> torch.Tensor:
        """``[L, nb, H, N, C]`` pages -> ``[L, 2, nb*N, H, D]``."""
        layers, nb, heads, n, _ = pages.shape
        d = self.fmt.head_size
        if self.fmt.packing == "kv_packed":
            six = pages.reshape(layers, nb, heads, n, 2, d).permute(0, 4, 1, 3, 2, 5)
        else:
            six = pages.reshape(layers, nb, heads, 2, n, d).permute(0, 3, 1, 4, 2, 5)
        return six.reshape(layers, 2, nb * n, heads, d)

    def _to_pages(self, kv: torch.Tensor, nb: int) -> torch.Tensor:
        """``[L, 2, nb*N, H, D]`` -> contiguous ``[L, nb, H, N, C]`` pages."""
        layers, _, _, heads, d = kv.shape
        n = self.kernel_tokens
        six = kv.reshape(layers, 2, nb, n, heads, d)
        if self.fmt.packing == "kv_packed":
            pages = six.permute(0, 2, 4, 3, 1, 5)
        else:
            pages = six.permute(0, 2, 4, 1, 3, 5)
        return pages.reshape(layers, nb, heads, n, 2 * d)

    def gather(self, block_ids: Sequence[int]) -> torch.Tensor:
        """KV of ``block_ids`` (in token order) as a new ``[L, 2, len(block_ids)*block_size, H, D]`` tensor."""
        ids = self._kernel_ids(block_ids)
        if self.stacked is not None:
            pages = self.stacked.index_select(1, ids)
        else:
            pages = torch.stack([view.index_select(0, ids) for view in self.views])
        return self._to_canonical(pages)

    def scatter(self, block_ids: Sequence[int], kv: torch.Tensor) -> None:
        """Write ``kv`` ``[L, 2, len(block_ids)*block_size, H, D]`` into the blocks ``block_ids``."""
        expected = (self.num_layers, 2, len(block_ids) * self.fmt.block_size, self.fmt.num_kv_heads, self.fmt.head_size)
        if tuple(kv.shape) != expected:
            raise ValueError(f"scatter got KV of shape {tuple(kv.shape)}, expected {expected}")
        ids = self._kernel_ids(block_ids)
        pages = self._to_pages(kv.to(self.device, self.dtype, non_blocking=True), len(ids))
        if self.stacked is not None:
            self.stacked.index_copy_(1, ids, pages)
        else:
            for view, layer_pages in zip(self.views, pages, strict=True):
                view.index_copy_(0, ids, layer_pages)
