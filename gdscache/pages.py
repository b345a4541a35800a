"""KV held in an engine's paged cache, stored from and retrieved into its pages in place.

Paged-attention engines (vLLM, SGLang) keep KV in fixed-size pages and give each sequence a list of
page ids. :class:`KVPages` describes one sequence's pages so that ``GDSCache.store`` and
``retrieve`` can take it where they take a ``[L, P, T, H, D]`` tensor: the cachegen kernels read
and write the pages directly (no gather or scatter copy); the other codecs gather and scatter.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from gdscache.spec import KVSpec
from io_backends.base import Rows

SKIP = -1
"""A page id that ``retrieve`` leaves alone (say, a prefix page the engine already holds)."""


class KVPages:
    """One sequence's KV in pages; stands in for the ``[L, P, len(page_ids) * page_tokens, H, D]`` tensor.

    ``pages``: ``[num_layers, kv_planes, num_pages, page_tokens, num_kv_heads, head_dim]`` with any
    strides, typically a permuted view of the engine's cache. ``page_ids``: the sequence's pages in
    token order; :data:`SKIP` marks a page ``retrieve`` must not write (``store`` needs every page).
    """

    def __init__(self, pages: torch.Tensor, page_ids: Sequence[int] | np.ndarray | torch.Tensor) -> None:
        if not isinstance(pages, torch.Tensor) or pages.dim() != 6:
            shape = tuple(pages.shape) if isinstance(pages, torch.Tensor) else type(pages).__name__
            raise ValueError(f"pages must be a 6-dim tensor [layers, planes, pages, page_tokens, heads, head_dim], "
                             f"got {shape}")
        ids = np.asarray(page_ids.cpu() if isinstance(page_ids, torch.Tensor) else page_ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"page_ids must be a 1-D sequence of ints, got {ids.dtype} of shape {ids.shape}")
        ids = ids.astype(np.int64)
        num_pages = pages.shape[2]
        if ids.size and (ids.min() < SKIP or ids.max() >= num_pages):
            raise ValueError(f"page_ids must be in [0, {num_pages}) or {SKIP} (skip), got {ids.min()}..{ids.max()}")
        used = ids[ids != SKIP]
        if np.unique(used).size != used.size:
            raise ValueError("page_ids name one page twice")
        self.spec = KVSpec.of(pages[:, :, 0])
        self.pages = pages
        self.page_ids = ids
        self.page_tokens = int(pages.shape[3])
        layers, planes, _, _, heads, dim = pages.shape
        self.shape = torch.Size((layers, planes, ids.size * self.page_tokens, heads, dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.pages.dtype

    @property
    def device(self) -> torch.device:
        return self.pages.device

    @property
    def is_cuda(self) -> bool:
        return self.pages.is_cuda

    @property
    def complete(self) -> bool:
        """True when no page is skipped."""
        return not bool((self.page_ids == SKIP).any())

    def tokens(self, start: int, stop: int) -> KVPages:
        """The pages of tokens ``[start, stop)``; both must fall on page boundaries."""
        n = self.page_tokens
        if start % n or stop % n or not 0 <= start <= stop <= self.shape[2]:
            raise ValueError(f"tokens [{start}, {stop}) are not whole pages of {n} tokens within {self.shape[2]}")
        part = copy.copy(self)  # a slice of checked ids: nothing to check again (this runs once per chunk)
        part.page_ids = self.page_ids[start // n : stop // n]
        part.shape = torch.Size((*self.shape[:2], stop - start, *self.shape[3:]))
        return part

    def strides(self) -> tuple[int, int, int, int]:
        """Element strides of layer, plane, head and head_dim."""
        s = self.pages.stride()
        return s[0], s[1], s[4], s[5]

    def token_offsets(self) -> np.ndarray:
        """Element offset of each token's first element from ``pages.data_ptr()`` (int64 ``[T]``); -1 if skipped."""
        slots = np.arange(self.page_tokens, dtype=np.int64) * self.pages.stride(3)
        at = self.page_ids[:, None] * self.pages.stride(2) + slots
        return np.where(self.page_ids[:, None] == SKIP, -1, at).reshape(-1)

    def _on_device(self, ids: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(ids).to(self.device, non_blocking=True)

    def gather(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The KV as a contiguous ``[L, P, T, H, D]`` tensor (into ``out``, contiguous, when given)."""
        if not self.complete:
            raise ValueError("cannot gather KV from skipped pages (page id -1)")
        layers, planes, _, heads, dim = self.shape
        if out is None:
            out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        elif tuple(out.shape) != tuple(self.shape) or not out.is_contiguous() or out.dtype != self.dtype:
            raise ValueError(f"gather needs a contiguous {self.dtype} out of shape {tuple(self.shape)}")
        six = out.view(layers, planes, len(self.page_ids), self.page_tokens, heads, dim)
        torch.index_select(self.pages, 2, self._on_device(self.page_ids), out=six)
        return out

    def scatter(self, kv: torch.Tensor) -> None:
        """Write ``kv`` (``[L, P, T, H, D]``) into the pages, leaving skipped pages alone."""
        if tuple(kv.shape) != tuple(self.shape):
            raise ValueError(f"scatter got KV of shape {tuple(kv.shape)}, expected {tuple(self.shape)}")
        keep = self.page_ids != SKIP
        layers, planes, _, heads, dim = self.shape
        six = kv.to(self.device, self.dtype, non_blocking=True).reshape(
            layers, planes, len(self.page_ids), self.page_tokens, heads, dim)
        if keep.all():
            self.pages.index_copy_(2, self._on_device(self.page_ids), six)
        elif keep.any():  # index, not a boolean mask (which would sync with the device)
            kept = self._on_device(np.flatnonzero(keep))
            self.pages.index_copy_(2, self._on_device(self.page_ids[keep]), six.index_select(2, kept))

    def __repr__(self) -> str:
        return f"KVPages(shape={tuple(self.shape)}, dtype={self.dtype}, pages={len(self.page_ids)}, device={self.device})"


def as_tensor(kv: torch.Tensor | KVPages) -> torch.Tensor:
    """``kv`` itself, or the KV its pages hold gathered into a tensor."""
    return kv.gather() if isinstance(kv, KVPages) else kv


def token_slice(kv: torch.Tensor | KVPages, start: int, stop: int) -> torch.Tensor | KVPages:
    """Tokens ``[start, stop)`` of a KV tensor (a view) or of pages."""
    return kv.tokens(start, stop) if isinstance(kv, KVPages) else kv[:, :, start:stop]


def stacked_view(views: Sequence[torch.Tensor | KVPages]) -> torch.Tensor | None:
    """``views`` as one ``[len(views), *shape]`` view when they are tensors of one shape, dtype and strides whose
    starts lie evenly spaced, ascending, in one storage (consecutive token slices of one tensor, the layers of
    one allocation); else None. :class:`~io_backends.base.Rows` give their stack as it is."""
    if isinstance(views, Rows):
        return views.stack if len(views) else None
    first = views[0] if views else None
    if not isinstance(first, torch.Tensor):
        return None
    if len(views) == 1:
        return first.unsqueeze(0)
    if not isinstance(views[1], torch.Tensor):
        return None
    offset = first.storage_offset()
    step = views[1].storage_offset() - offset
    if step <= 0:
        return None
    one_shape, one_strides, dtype = first.shape, first.stride(), first.dtype
    shape, strides = (len(views), *one_shape), (step, *one_strides)
    if first.numel():  # the stack must lie in the first view's storage: then a view at its address is its memory
        last = offset + sum((n - 1) * stride for n, stride in zip(shape, strides, strict=True))
        if (last + 1) * first.element_size() > first.untyped_storage().nbytes():
            return None
    address, gap = first.data_ptr(), step * first.element_size()
    for view in views:  # addresses, not storages: a storage per view would cost more than the rest
        if not isinstance(view, torch.Tensor) or view.data_ptr() != address or view.shape != one_shape \
                or view.stride() != one_strides or view.dtype != dtype:
            return None
        address += gap
    return first.as_strided(shape, strides, offset)
