"""A process that forks after using gdscache: the child's copies of the shared helper pools have no threads."""

from __future__ import annotations

import multiprocessing
import os

import torch

from gdscache.format.checksum import XXH3_64, PipelinedDigest, digest_runs
from io_backends.base import fsync_all

CHILD_TIMEOUT_S = 60


def _hash_in_pieces(runs: list[torch.Tensor]) -> bytes:
    digest = PipelinedDigest(XXH3_64)
    for i, run in enumerate(runs):
        digest.feed([run], overlap=i + 1 < len(runs))
    return digest.digest()


def _child(runs: list[torch.Tensor], expected: bytes, path: str) -> None:
    """Exits 0 when both shared pools work here as they did in the parent."""
    ok = _hash_in_pieces(runs) == expected
    fds = [os.open(f"{path}.{i}", os.O_WRONLY | os.O_CREAT, 0o644) for i in range(3)]
    try:
        ok = ok and fsync_all(fds) == [None, None, None]
    finally:
        for fd in fds:
            os.close(fd)
    os._exit(0 if ok else 1)


def test_shared_pools_work_in_a_forked_child(tmp_path):
    runs = [torch.randint(0, 256, (1 << 20,), dtype=torch.uint8) for _ in range(4)]
    expected = digest_runs(runs, XXH3_64)
    # the parent starts both pools (and leaves their threads idle) before it forks
    assert _hash_in_pieces(runs) == expected
    fds = [os.open(tmp_path / f"parent.{i}", os.O_WRONLY | os.O_CREAT, 0o644) for i in range(2)]
    assert fsync_all(fds) == [None, None]
    for fd in fds:
        os.close(fd)
    child = multiprocessing.get_context("fork").Process(target=_child, args=(runs, expected, str(tmp_path / "child")))
    child.start()
    _finished_well(child, "a shared pool")


def _finished_well(child: multiprocessing.process.BaseProcess, what: str) -> None:
    """Assert that a forked child exits 0 within CHILD_TIMEOUT_S (a hang is killed and reported)."""
    child.join(CHILD_TIMEOUT_S)
    if child.is_alive():
        child.kill()
        child.join()
        raise AssertionError(f"the forked child hung for {CHILD_TIMEOUT_S} s on {what}")
    assert child.exitcode == 0


def _child_takes_the_locks() -> None:
    from gdscache.codecs import _cuda
    from io_backends.buffers import host_pool

    host_pool.release(host_pool.acquire(4096))
    _cuda._library._tried = False  # make _load take its lock again (and load nothing: this test is about the lock)
    os.environ["GDSCACHE_NO_KERNELS"] = "1"
    _cuda._load()
    os._exit(0)


def test_locks_held_by_the_parent_at_fork_are_free_in_the_child():
    """The parent forks while it holds the host buffer pool's lock and the kernel loader's lock (as an I/O thread
    could at that moment); the child must still get both."""
    from gdscache.codecs import _cuda
    from io_backends.buffers import host_pool

    tried = _cuda._library._tried
    with host_pool._lock, _cuda._library._lock:
        child = multiprocessing.get_context("fork").Process(target=_child_takes_the_locks)
        child.start()
    _finished_well(child, "a lock held at the fork")
    assert _cuda._library._tried == tried
