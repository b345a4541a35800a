"""How a GPU store splits its chunks into batches (encoded and checksummed while the previous batch is written)."""

from __future__ import annotations

import pytest

from gdscache.api import STORE_BATCHES, store_batches


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 16, 17, 127, 128, 129, 1000])
@pytest.mark.parametrize("group", [1, 4, 128])
def test_batches_cover_every_chunk_in_order_within_the_group_size(n, group):
    batches = store_batches(n, group)
    assert [i for start, stop in batches for i in range(start, stop)] == list(range(n))
    sizes = [stop - start for start, stop in batches]
    assert all(1 <= size <= group for size in sizes)
    assert len(batches) >= min(n, STORE_BATCHES)
    if -(-n // group) >= STORE_BATCHES:  # more than the minimum needed for the group size: no more than that
        assert len(batches) == -(-n // group)
    assert not sizes or max(sizes) - min(sizes) <= 1  # as even as they come


def test_sixteen_small_chunks_go_in_four_batches():
    assert store_batches(16, 128) == [(0, 4), (4, 8), (8, 12), (12, 16)]
