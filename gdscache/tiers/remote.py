"""The remote tier: chunk objects in a shared object store (S3 or any fsspec URL), behind the local tier.

Objects live at ``<url>/<namespace-hex>/<key-hex>.gdc`` and hold exactly the bytes of a local
chunk file (header + payload, :func:`gdscache.format.chunkfile.pack_object`), so any process with
the same namespace can read what another wrote.

Faults never reach the caller. Every operation has a deadline (``timeout_s``) that covers its
retries (exponential backoff with jitter); a failure is counted, logged and turned into a miss (or
a dropped upload). After ``failure_threshold`` consecutive failures a circuit breaker opens: every
operation becomes an immediate miss while a background thread probes the store every
``probe_interval_s`` and closes the breaker as soon as the store answers again.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch

from gdscache.format.chunkfile import (
    HEADER_SIZE,
    PAYLOAD_OFFSET,
    ChunkMeta,
    CorruptChunk,
    pack_header,
    unpack_header,
    unpack_object,
    verify_payload,
)
from io_backends.fsspec_store import FsspecStore

log = logging.getLogger(__name__)
T = TypeVar("T")
SUFFIX = ".gdc"
NAMESPACE_FILE = "namespace.json"
_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0
_STOP = object()


class RemoteTier:
    """Chunks in an object store, uploaded write-through or write-behind. Thread-safe."""

    def __init__(self, url: str, options: dict, *, timeout_s: float, concurrency: int,
                 write_mode: Literal["through", "behind"], failure_threshold: int = 3,
                 probe_interval_s: float = 1.0, max_attempts: int = 3, queue_depth: int | None = None) -> None:
        """Open the store at ``url`` and check it.

        ``options`` go to :class:`io_backends.fsspec_store.FsspecStore` (endpoint_url, region,
        path_style, prefix, credentials, ...). ``concurrency`` bounds the foreground operations in
        flight (reads, existence checks, write-through uploads) and, separately, the background
        upload threads of write-behind mode, whose queue holds ``queue_depth`` chunks (default
        ``4 * concurrency``).

        Raises ``ValueError`` with a plain message when the URL or options are invalid, the
        credentials are refused, or the bucket does not exist. A store that does not answer at
        start-up is not an error: the tier starts degraded and recovers when the store comes up.
        """
        if write_mode not in ("through", "behind"):
            raise ValueError(f"remote write_mode must be 'through' or 'behind', got {write_mode!r}")
        if not timeout_s > 0:
            raise ValueError(f"remote timeout_s must be > 0, got {timeout_s!r}")
        if concurrency < 1 or failure_threshold < 1 or max_attempts < 1 or probe_interval_s <= 0:
            raise ValueError("remote concurrency, failure_threshold, max_attempts and probe_interval_s must be positive")
        self.timeout_s = float(timeout_s)
        self.write_mode = write_mode
        self.max_attempts = max_attempts
        self.probe_interval_s = probe_interval_s
        self._failure_threshold = failure_threshold
        # every object read is verified here (header checksum, key, payload checksum): S3's CRC would be a second pass
        self.store = FsspecStore(url, options, timeout_s=self.timeout_s, concurrency=concurrency,
                                 check_read_checksums=False)
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._failures = 0
        self._healthy = True
        self._closed = False
        self._slots = threading.BoundedSemaphore(concurrency)
        self._namespaces_written: set[bytes] = set()
        self._namespace_info: dict[bytes, bytes] = {}
        self._check_at_start()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._prober = threading.Thread(target=self._probe_loop, name="gdscache-remote-probe", daemon=True)
        self._prober.start()
        self._queue: queue.Queue[Any] | None = None
        self._uploaders: list[threading.Thread] = []
        if write_mode == "behind":
            self._queue = queue.Queue(maxsize=queue_depth or 4 * concurrency)
            self._uploaders = [
                threading.Thread(target=self._upload_loop, name=f"gdscache-upload-{i}", daemon=True)
                for i in range(concurrency)
            ]
            for thread in self._uploaders:
                thread.start()

    # ------------------------------------------------------------------ public API
    def put(self, namespace: bytes, key: bytes, meta: ChunkMeta, payload: torch.Tensor) -> None:
        """Upload one chunk: now (``through``) or from a bounded background queue (``behind``).

        Never raises for storage faults: a failed upload is logged, counted and dropped. In
        ``behind`` mode a full queue blocks for at most ``timeout_s``, then drops the chunk; the
        caller must not modify ``payload`` afterwards.
        """
        self._check_open()
        object_key(namespace, key)
        if not self._healthy:
            self._count("dropped")
            return
        if self._queue is None:
            self._upload(namespace, key, meta, payload, bounded=True)
            return
        try:
            self._queue.put((namespace, key, meta, payload.cpu()), timeout=self.timeout_s)
        except queue.Full:
            self._count("dropped")
            log.debug("remote upload queue full for %.3g s; dropped chunk %s", self.timeout_s, key.hex())

    def get(self, namespace: bytes, key: bytes) -> tuple[ChunkMeta, torch.Tensor] | None:
        """The chunk's header and verified payload (a CPU uint8 tensor), or ``None`` for a miss.

        A miss is: not found, corrupt (bad header, checksum, or another key), timed out, or store
        down. Never raises for storage faults; returns within about ``timeout_s``.
        """
        self._check_open()
        path = object_key(namespace, key)
        self._count("gets")
        data = self._guarded(f"get {path}", lambda t: self.store.get(path, timeout=t), None)
        if data is None:
            self._count("misses")
            return None
        try:
            meta, payload = _unpack(data, key)
            if meta.namespace != namespace:
                raise CorruptChunk("object holds another namespace")
        except CorruptChunk as exc:
            log.warning("remote object %s is corrupt (%s); treating it as a miss", path, exc)
            self._count("corrupt", "misses")
            return None
        self._count("hits")
        self._count("bytes_got", n=len(data))
        return meta, payload

    def contains(self, namespace: bytes, key: bytes) -> bool:
        """Whether the object exists; ``False`` on errors, timeouts, or while the store is down."""
        self._check_open()
        path = object_key(namespace, key)
        self._count("contains")
        return bool(self._guarded(f"head {path}", lambda t: self.store.exists(path, timeout=t), False))

    def put_namespace_info(self, namespace: bytes, info: dict) -> None:
        """Write ``<namespace-hex>/namespace.json`` (the human-readable fingerprint) once per process.

        If the store is down, the next successful chunk upload of that namespace writes it.
        """
        self._check_open()
        with self._lock:
            self._namespace_info.setdefault(namespace, json.dumps(info, sort_keys=True, indent=1, default=str).encode())
        self._write_namespace_info(namespace, bounded=True)

    def flush(self) -> None:
        """Wait until every queued upload has finished (succeeded, failed, or been dropped)."""
        if self._queue is not None:
            self._queue.join()

    def close(self) -> None:
        """Flush, then stop the background threads and release the store. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        for _ in self._uploaders:
            assert self._queue is not None
            self._queue.put(_STOP)
        for thread in self._uploaders:
            thread.join()
        self._stop.set()
        self._wake.set()
        self._prober.join()
        self.store.close()

    def stats(self) -> dict:
        """Counters (puts, gets, hits, misses, errors, timeouts, corrupt, dropped, fast_misses,
        bytes_put, bytes_got), ``healthy`` and the upload ``queue_depth``."""
        with self._lock:
            out: dict[str, Any] = {name: self._counts[name] for name in (
                "puts", "gets", "hits", "misses", "contains", "errors", "timeouts", "corrupt", "dropped",
                "fast_misses", "bytes_put", "bytes_got")}
            out["healthy"] = self._healthy
        out["queue_depth"] = self._queue.qsize() if self._queue is not None else 0
        out["write_mode"] = self.write_mode
        out["url"] = self.store.describe()
        return out

    @property
    def healthy(self) -> bool:
        """False while the circuit breaker is open (the store is considered down)."""
        return self._healthy

    def __repr__(self) -> str:
        return f"RemoteTier({self.store!r}, write_mode={self.write_mode!r}, timeout_s={self.timeout_s})"

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this RemoteTier is closed")

    def _check_at_start(self) -> None:
        where = self.store.describe()
        try:
            self.store.check(timeout=self.timeout_s)
        except PermissionError:
            raise ValueError(
                f"object store {where}: access denied. Check the credentials (AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY / AWS_PROFILE, or remote_options key/secret) and that they may use "
                f"bucket {self.store.bucket!r}"
            ) from None
        except FileNotFoundError:
            raise ValueError(
                f"object store {where}: bucket {self.store.bucket!r} does not exist; create it first "
                f"(e.g. `aws s3 mb s3://{self.store.bucket}`) or fix remote_url"
            ) from None
        except Exception as exc:  # noqa: BLE001 - unreachable now: start degraded, the prober brings it back
            with self._lock:
                self._healthy = False
            log.warning("object store %s is not answering at start-up (%s); serving misses until it does",
                        where, self._describe_error(exc))

    def _count(self, *names: str, n: int = 1) -> None:
        with self._lock:
            for name in names:
                self._counts[name] += n

    def _upload(self, namespace: bytes, key: bytes, meta: ChunkMeta, payload: torch.Tensor, *, bounded: bool) -> None:
        path = object_key(namespace, key)
        # pack_object's bytes, handed over as header + payload: the store copies them once, into its
        # request bodies (joining them here first took ~10% of a 32 MiB upload's time on a 2-core VM)
        data = [pack_header(meta), payload.detach().cpu().contiguous().numpy()]
        if self._guarded(f"put {path}", lambda t: self.store.put(path, data, timeout=t) or True, False, bounded=bounded):
            self._count("puts")
            self._count("bytes_put", n=HEADER_SIZE + payload.numel())
            self._write_namespace_info(namespace, bounded=bounded)
        else:
            self._count("dropped")

    def _write_namespace_info(self, namespace: bytes, *, bounded: bool) -> None:
        with self._lock:
            blob = self._namespace_info.get(namespace)
            if blob is None or namespace in self._namespaces_written or not self._healthy:
                return
            self._namespaces_written.add(namespace)  # one writer at a time; undone on failure
        path = f"{namespace.hex()}/{NAMESPACE_FILE}"
        if not self._guarded(f"put {path}", lambda t: self.store.put(path, blob, timeout=t) or True, False,
                             bounded=bounded):
            with self._lock:
                self._namespaces_written.discard(namespace)

    def _upload_loop(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._healthy:
                    self._upload(*item, bounded=False)
                else:
                    self._count("dropped")
            except Exception:  # a bug here must not kill the uploader and hang flush()
                log.exception("remote upload failed unexpectedly")
            finally:
                self._queue.task_done()

    def _guarded(self, what: str, fn: Callable[[float], T], default: T, *, bounded: bool = True) -> T:
        """``fn(remaining_seconds)`` under the deadline, retried with backoff; ``default`` on any fault.

        ``bounded`` operations take one of the ``concurrency`` slots (background uploads are bounded
        by their thread count instead). ``FileNotFoundError`` is an answer (absent), not a fault.
        """
        if not self._healthy:
            self._count("fast_misses")
            return default
        deadline = time.monotonic() + self.timeout_s
        if bounded and not self._slots.acquire(timeout=self.timeout_s):
            self._failed(what, TimeoutError(f"all object-store slots stayed busy for {self.timeout_s:.3g} s"))
            return default
        try:
            value = self._retrying(fn, deadline)
        except FileNotFoundError:
            self._succeeded()
            return default
        except Exception as exc:  # noqa: BLE001 - any storage fault is a miss, never the caller's exception
            self._failed(what, exc)
            return default
        finally:
            if bounded:
                self._slots.release()
        self._succeeded()
        return value

    def _retrying(self, fn: Callable[[float], T], deadline: float) -> T:
        attempt = 1
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"deadline of {self.timeout_s:.3g} s passed")
            try:
                return fn(remaining)
            except (FileNotFoundError, PermissionError, ValueError, TypeError):
                raise
            except Exception:
                delay = min(_MAX_BACKOFF_S, _BACKOFF_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                if attempt >= self.max_attempts or time.monotonic() + delay >= deadline:
                    raise
                time.sleep(delay)
                attempt += 1

    def _succeeded(self) -> None:
        with self._lock:
            self._failures = 0

    def _failed(self, what: str, exc: BaseException) -> None:
        timed_out = _is_timeout(exc)
        with self._lock:
            self._counts["timeouts" if timed_out else "errors"] += 1
            self._failures += 1
            first = self._failures == 1
            trip = self._healthy and self._failures >= self._failure_threshold
            if trip:
                self._healthy = False
        message = self._describe_error(exc)
        if trip:
            log.warning("object store %s is failing (%d in a row, last: %s: %s); serving misses and probing every %.3g s",
                        self.store.describe(), self._failure_threshold, what, message, self.probe_interval_s)
            self._wake.set()
        elif first:
            log.warning("object store %s: %s failed: %s", self.store.describe(), what, message)
        else:
            log.debug("object store %s: %s failed: %s", self.store.describe(), what, message)

    def _describe_error(self, exc: BaseException) -> str:
        return self.store.scrub(f"{type(exc).__name__}: {exc}")

    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.probe_interval_s)
            self._wake.clear()
            if self._stop.is_set() or self._healthy:
                continue
            try:
                self.store.check(timeout=self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - still down, whatever the reason
                log.debug("object store %s still down: %s", self.store.describe(), self._describe_error(exc))
                continue
            with self._lock:
                self._healthy = True
                self._failures = 0
            log.warning("object store %s answers again; remote tier resumed", self.store.describe())


def object_key(namespace: bytes, key: bytes) -> str:
    """``<namespace-hex>/<key-hex>.gdc``, relative to the remote URL (which carries the prefix)."""
    if not isinstance(namespace, bytes) or not isinstance(key, bytes) or not namespace or not key:
        raise TypeError(f"namespace and key must be non-empty bytes, got {type(namespace).__name__} and {type(key).__name__}")
    return f"{namespace.hex()}/{key.hex()}{SUFFIX}"


def _unpack(data: bytes | memoryview, key: bytes) -> tuple[ChunkMeta, torch.Tensor]:
    """Parse and verify an object (:func:`unpack_object`'s checks); a writable buffer is used in place.

    ``unpack_object`` copies the payload out of the object, which costs as much as the download
    itself for 32 MiB chunks on a busy host; a buffer the tier owns can simply back the tensor.
    """
    if isinstance(data, bytes) or memoryview(data).readonly:
        return unpack_object(memoryview(data), expected_key=key)
    meta = unpack_header(bytes(data[:HEADER_SIZE]), len(data))
    if meta.key != key:
        raise CorruptChunk("object holds another key")
    payload = (torch.frombuffer(data, dtype=torch.uint8, offset=PAYLOAD_OFFSET, count=meta.payload_len)
               if meta.payload_len else torch.empty(0, dtype=torch.uint8))
    verify_payload(meta, payload)
    return meta, payload


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__
