"""Aligned host buffers and their pool."""

from __future__ import annotations

import os

import torch

from io_backends.base import ALIGN
from io_backends.buffers import HostBufferPool, aligned_empty


def test_aligned_empty_is_page_aligned():
    for n in (1, 4095, 4096, 1 << 20):
        buf = aligned_empty(n)
        assert buf.numel() == n and buf.data_ptr() % ALIGN == 0


def test_pool_reuses_released_buffers_of_the_same_size_class():
    pool = HostBufferPool(max_bytes=1 << 20)
    a = pool.acquire(5000)
    assert a.numel() == 5000 and a.data_ptr() % ALIGN == 0
    ptr = a.data_ptr()
    pool.release(a)
    b = pool.acquire(8000)  # same 8 KiB class
    assert b.data_ptr() == ptr and b.numel() == 8000
    c = pool.acquire(8000)  # the class is empty again: a new buffer
    assert c.data_ptr() != ptr


def test_pool_keeps_at_most_max_bytes_and_ignores_foreign_buffers():
    pool = HostBufferPool(max_bytes=8192)
    bufs = [pool.acquire(4096) for _ in range(3)]
    for b in bufs:
        pool.release(b)
    assert pool._free_bytes == 8192
    pool.release(torch.empty(4096, dtype=torch.uint8)[1:])  # unaligned, not ours
    assert pool._free_bytes == 8192


def test_fsync_all_syncs_each_file_and_reports_each_failure(tmp_path):
    from io_backends.base import fsync_all

    fds = [os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT) for name in ("a", "b", "c")]
    try:
        for fd in fds:
            os.write(fd, b"x" * 5000)
        assert fsync_all(fds) == [None, None, None]  # on the shared pool
        assert fsync_all(fds[:1]) == [None]  # here
    finally:
        for fd in fds[1:]:
            os.close(fd)
    errors = fsync_all(fds)  # two of them closed now
    assert errors[0] is None
    assert all(isinstance(e, OSError) for e in errors[1:])
    os.close(fds[0])
