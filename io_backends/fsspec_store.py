"""``ObjectStore`` over any fsspec URL: ``s3://bucket/prefix``, ``gs://...``, ``file:///dir``, ``memory://name``.

S3 object bodies move through botocore's blocking client on a small thread pool (``concurrency``
threads, at least ``MIN_THREADS``, which bound the requests in flight): a GET into one writable
buffer the caller may keep, a PUT for objects under ``multipart_threshold``, and a multipart upload
(parts in parallel on the pool, aborted on failure) for larger ones. Upload bodies are copied into
buffers reused across requests (at most one idle buffer per pool thread is kept). On the measurement machine this moved bodies markedly faster
than s3fs/aiohttp (benchmarks/results/s3.md). Existence checks, listing and deletes go through s3fs
(aiobotocore) on fsspec's event-loop thread; other URLs go through their fsspec filesystem.

Every call takes a ``timeout``: async requests are cancelled when it runs out, blocking ones are
abandoned (botocore's own read timeout, set to the same value, ends them; an abandoned multipart
upload is aborted once its requests have ended), so a dead or frozen server never holds the caller
past it. Retries are left to the caller (``gdscache.tiers.remote``): s3fs and botocore retry
nothing here. An object is either complete or absent: a PUT or a completed multipart upload.

Options, besides anything the fsspec filesystem itself accepts (``key``, ``secret``, ``token``,
``profile``, ``anon``, ``client_kwargs``, ``config_kwargs``, ...):

- ``endpoint_url``: a self-hosted S3 (SeaweedFS, MinIO, Ceph), e.g. ``http://127.0.0.1:8333``;
- ``region``: the S3 region (``region_name`` for botocore);
- ``path_style``: ``True`` addresses ``endpoint/bucket/key`` instead of ``bucket.endpoint/key``;
- ``prefix``: a key prefix appended to the URL's path;
- ``multipart_chunksize``: S3 part size (default 16 MiB); a multipart upload sends parts of this
  size in parallel (the last part takes the remainder, so every part is at least this size). Each
  part is one request: on the measurement machine, 32 MiB uploads at 8 threads were markedly
  slower in 8 MiB parts than in 16 MiB ones (benchmarks/results/s3.md).
- ``multipart_threshold``: objects of at least this many bytes go up as a multipart upload, smaller
  ones as one PUT (default 64 MiB, and never under two parts; at least ``multipart_chunksize``).
  On the measurement machine a 32 MiB object cost the server and client more as two parts than as
  one PUT, at 1 and 8 threads alike (benchmarks/results/s3.md); on a server far away, parallel
  parts may pay for smaller objects: lower it there.

Without ``key``/``secret``, credentials come from the standard AWS chain (environment, profile,
instance metadata). Secrets never appear in ``repr`` or in error text produced here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import mmap
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import fsspec
import numpy
from fsspec.implementations.local import LocalFileSystem

from io_backends.base import ObjectStore

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PART_SIZE = 16 << 20
DEFAULT_MULTIPART_THRESHOLD = 64 << 20
MIN_PART_SIZE = 5 << 20
MIN_THREADS = 4
"""S3 requests in flight at most: ``max(concurrency, MIN_THREADS)``, so that even at concurrency 1 a
multipart upload sends up to this many parts at once."""
_GRACE_S = 0.25
_SESSION_TIMEOUT_S = 60.0
_READ_PIECE = 1 << 20
_MAPPED_READ = 4 << 20
_S3_PROTOCOLS = ("s3", "s3a")
_SECRET_NAMES = re.compile(r"secret|token|password|passwd|credential|sas|account_key|connection_string|^key$"
                           r"|access_key", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?<=://)[^/@]*@")


def redact(value: Any) -> Any:
    """A copy of ``value`` (options, possibly nested) with every secret-looking entry replaced by ``'***'``."""
    if isinstance(value, dict):
        return {k: "***" if _SECRET_NAMES.search(str(k)) and v is not None else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` part."""
    return _URL_USERINFO.sub("***@", url)


def _secret_values(value: Any) -> set[str]:
    if isinstance(value, dict):
        found: set[str] = set()
        for k, v in value.items():
            if _SECRET_NAMES.search(str(k)) and isinstance(v, str) and len(v) >= 4:
                found.add(v)
            else:
                found |= _secret_values(v)
        return found
    if isinstance(value, (list, tuple)):
        return set().union(*(_secret_values(v) for v in value)) if value else set()
    return set()


class FsspecStore(ObjectStore):
    """Objects under ``url`` in any fsspec filesystem; keys are ``/``-separated paths below it."""

    name = "fsspec"

    def __init__(self, url: str, options: dict[str, Any] | None = None, *, timeout_s: float | None = 10.0,
                 concurrency: int = 8, check_read_checksums: bool = True) -> None:
        """``check_read_checksums=False`` skips botocore's validation of S3's CRC checksums on reads,
        for callers that verify every byte they read themselves (uploads still send a checksum)."""
        if not isinstance(url, str) or "://" not in url:
            raise ValueError(f"object store URL must look like s3://bucket/prefix or file:///dir, got {url!r}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        opts = dict(options or {})
        self.url = url
        self._secrets = _secret_values(opts)
        self._shown_options = redact(opts)
        self.timeout_s = timeout_s
        self.part_size = int(opts.pop("multipart_chunksize", DEFAULT_PART_SIZE))
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(f"multipart_chunksize must be >= {MIN_PART_SIZE} (the S3 minimum part), got {self.part_size}")
        threshold = opts.pop("multipart_threshold", None)
        self.multipart_threshold = (max(DEFAULT_MULTIPART_THRESHOLD, 2 * self.part_size) if threshold is None
                                    else int(threshold))
        if self.multipart_threshold < self.part_size:
            raise ValueError(f"multipart_threshold must be >= multipart_chunksize ({self.part_size}), "
                             f"got {self.multipart_threshold}")
        prefix = str(opts.pop("prefix", "") or "").strip("/")
        protocol = url.split("://", 1)[0].lower()
        self.is_s3 = protocol in _S3_PROTOCOLS
        if self.is_s3:
            opts = _s3_options(opts, timeout_s, concurrency, check_read_checksums)
        else:
            for name in ("endpoint_url", "region", "path_style"):
                if name in opts:
                    raise ValueError(f"remote option {name!r} applies to s3:// URLs only, not {protocol}://")
        try:
            self.fs = fsspec.filesystem(protocol, skip_instance_cache=True, **opts)
        except (ImportError, ValueError) as exc:
            raise ValueError(f"cannot open {redact_url(url)}: {self.scrub(str(exc))}") from None
        if self.is_s3:
            self.fs.retries = 1  # one attempt per call: the caller retries with backoff inside its deadline
        root = self.fs._strip_protocol(url).rstrip("/")
        self.root = f"{root}/{prefix}" if prefix else root
        self.bucket = self.root.lstrip("/").split("/", 1)[0]
        if self.is_s3 and not self.bucket:
            raise ValueError(f"S3 URL {redact_url(url)!r} names no bucket; use s3://BUCKET/PREFIX")
        self._async = bool(getattr(self.fs, "async_impl", False))
        self._blocking_s3: _BlockingS3 | None = None
        if self.is_s3:  # build the clients now (service model, credential chain): no operation's deadline pays it
            try:
                self._await(self.fs.set_session(), _SESSION_TIMEOUT_S, "set up the S3 client")
                self._blocking_s3 = _blocking_s3(opts)
            except Exception as exc:  # noqa: BLE001 - e.g. an unknown profile, a malformed option
                raise ValueError(f"cannot set up the S3 client for {self.describe()}: "
                                 f"{self.scrub(f'{type(exc).__name__}: {exc}')}") from None
        threads = max(concurrency, MIN_THREADS) if self._blocking_s3 is not None else concurrency
        self._pool = (cf.ThreadPoolExecutor(threads, thread_name_prefix="fsspec-store")
                      if self._blocking_s3 is not None or not self._async else None)
        self._bodies = _Bodies(threads)

    # ------------------------------------------------------------------ ObjectStore
    def put(self, key: str, data: bytes | memoryview | Sequence[bytes | memoryview], *,
            timeout: float | None = None) -> None:
        """Store ``data``, or the concatenation of a sequence of buffers, under ``key``.

        S3 objects of ``multipart_threshold`` bytes or more go up as a multipart upload. The caller's
        buffers are only read during this call (copied into each request's body first), so it may
        reuse them once the call returns, even after a timeout.
        """
        path = self._path(key)
        pieces = _byte_views(data)
        size = sum(len(piece) for piece in pieces)
        if self._blocking_s3 is not None:
            s3 = self._blocking_s3
            bucket, obj, _ = self.fs.split_path(path)
            if size < self.multipart_threshold:
                body = data if isinstance(data, bytes) else self._bodies.copy(pieces, 0, size)
                self._in_thread(lambda: self._bodies.sending(body, s3.call, "put_object", Bucket=bucket, Key=obj,
                                                             Body=body, **s3.extra), timeout, f"put {key}")
            else:
                self._multipart_put(bucket, obj, pieces, size, timeout, f"put {key}")
            return
        body = data if isinstance(data, bytes) else b"".join(pieces)
        if self.is_s3:
            self._await(self.fs._pipe_file(path, body, chunksize=self.part_size), timeout, f"put {key}")
        elif isinstance(self.fs, LocalFileSystem):
            self._in_thread(lambda: _atomic_local_write(path, body), timeout, f"put {key}")
        else:
            self._call("pipe_file", path, body, timeout=timeout, what=f"put {key}")

    def get(self, key: str, *, timeout: float | None = None) -> bytes | memoryview:
        """The whole object; S3 reads return a writable ``memoryview`` of bytes (filled in place, no
        second copy), which compares equal to ``bytes`` of the same content."""
        path = self._path(key)
        if self._blocking_s3 is not None:
            s3 = self._blocking_s3
            bucket, obj, _ = self.fs.split_path(path)
            return self._in_thread(lambda: s3.get(bucket, obj), timeout, f"get {key}")
        if self.is_s3:  # one GET, no HEAD first
            return self._await(self.fs._cat_file(path, max_concurrency=1), timeout, f"get {key}")
        return self._call("cat_file", path, timeout=timeout, what=f"get {key}")

    def exists(self, key: str, *, timeout: float | None = None) -> bool:
        path = self._path(key)
        if self.is_s3:  # HEAD the object only: no listing fallback, no listing cache
            bucket, obj, _ = self.fs.split_path(path)
            try:
                self._await(self.fs._call_s3("head_object", Bucket=bucket, Key=obj), timeout, f"head {key}")
            except FileNotFoundError:
                return False
            return True
        return bool(self._call("exists", path, timeout=timeout, what=f"exists {key}"))

    def delete(self, key: str, *, timeout: float | None = None) -> None:
        try:
            self._call("rm_file", self._path(key), timeout=timeout, what=f"delete {key}")
        except FileNotFoundError:
            pass

    def list(self, prefix: str = "", *, timeout: float | None = None) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        self.fs.invalidate_cache(base)
        try:
            found = self._call("find", base, timeout=timeout, what=f"list {prefix}")
        except FileNotFoundError:
            return []
        root = self.root.strip("/")
        return sorted(p.strip("/")[len(root):].lstrip("/") for p in found)

    def check(self, *, timeout: float | None = None) -> None:
        """Prove the store is usable: the S3 bucket exists and the credentials are accepted.

        Raises ``PermissionError`` (credentials refused), ``FileNotFoundError`` (no such bucket),
        ``TimeoutError`` or another ``Exception`` (unreachable).
        """
        if self.is_s3:
            self._await(self.fs._call_s3("head_bucket", Bucket=self.bucket), timeout, f"head bucket {self.bucket}")
        elif isinstance(self.fs, LocalFileSystem):
            self._in_thread(lambda: os.makedirs(self.root, exist_ok=True), timeout, f"create {self.root}")
        elif hasattr(self.fs, "split_path"):  # other object stores: the bucket must exist
            self._call("info", self.bucket, timeout=timeout, what=f"bucket {self.bucket}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ helpers
    def scrub(self, text: str) -> str:
        """``text`` with every configured secret value blanked out (for logs and error messages)."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def describe(self) -> str:
        """The store's URL (and endpoint), safe to log."""
        endpoint = self._shown_options.get("endpoint_url")
        return redact_url(self.url) + (f" at {redact_url(str(endpoint))}" if endpoint else "")

    def __repr__(self) -> str:
        return f"FsspecStore({redact_url(self.url)!r}, options={self._shown_options!r})"

    def _path(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"object key must be a relative path without '..', got {key!r}")
        return f"{self.root}/{key}"

    def _call(self, method: str, *args: Any, timeout: float | None, what: str) -> Any:
        if self._async:
            return self._await(getattr(self.fs, "_" + method)(*args), timeout, what)
        return self._in_thread(lambda: getattr(self.fs, method)(*args), timeout, what)

    def _await(self, coro: Coroutine[Any, Any, T], timeout: float | None, what: str) -> T:
        """Run ``coro`` on fsspec's loop thread; cancel it and raise ``TimeoutError`` after ``timeout``."""
        if timeout is not None:
            coro = asyncio.wait_for(coro, timeout)
        future = asyncio.run_coroutine_threadsafe(coro, self.fs.loop)
        try:
            return future.result(None if timeout is None else timeout + _GRACE_S)
        except TimeoutError:  # wait_for's, or ours when the loop itself is stuck
            future.cancel()
            raise TimeoutError(f"{what}: no answer from {self.describe()} within {timeout:.3g} s") from None

    def _in_thread(self, fn: Callable[[], T], timeout: float | None, what: str) -> T:
        assert self._pool is not None
        return self._result(self._pool.submit(fn), _deadline(timeout), timeout, what)

    def _result(self, future: cf.Future[T], deadline: float | None, timeout: float | None, what: str) -> T:
        """``future``'s result, or ``TimeoutError`` once ``deadline`` (``time.monotonic()``) passes."""
        try:
            return future.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except cf.TimeoutError:
            future.cancel()
            raise TimeoutError(f"{what}: no answer from {self.describe()} within {timeout:.3g} s") from None

    def _multipart_put(self, bucket: str, obj: str, pieces: list[memoryview], size: int, timeout: float | None,
                       what: str) -> None:
        """Create, upload the parts in parallel on the pool, complete; abort on any failure or timeout.

        Until the completion succeeds the object does not exist, so a failed upload leaves nothing
        behind (the abort frees the parts already stored). Parts are copied out of ``pieces`` here,
        while the upload is being created, before anything waits on the server.
        """
        assert self._pool is not None and self._blocking_s3 is not None
        s3, pool, deadline = self._blocking_s3, self._pool, _deadline(timeout)
        target = {"Bucket": bucket, "Key": obj, **s3.extra}
        create = pool.submit(s3.call, "create_multipart_upload", **target, **s3.checksum)
        count = size // self.part_size  # the last part takes the remainder: every part >= part_size
        bodies = [self._bodies.copy(pieces, n * self.part_size, (n + 1) * self.part_size if n < count - 1 else size)
                  for n in range(count)]
        parts: list[cf.Future[dict[str, Any]]] = []
        complete: cf.Future[dict[str, Any]] | None = None
        try:
            upload_id = self._result(create, deadline, timeout, what)["UploadId"]
            parts = [pool.submit(self._bodies.sending, body, s3.upload_part, target, upload_id, n + 1, body)
                     for n, body in enumerate(bodies)]
            del bodies  # each part's memory goes when its request ends
            done = [self._result(part, deadline, timeout, what) for part in parts]
            complete = pool.submit(s3.call, "complete_multipart_upload", **target, UploadId=upload_id,
                                   MultipartUpload={"Parts": done})
            self._result(complete, deadline, timeout, what)
        except BaseException:
            for future in (create, *parts, *([complete] if complete else [])):
                future.cancel()  # the ones not started yet; the abort waits for the others
            try:
                pool.submit(_abort_upload, s3, target, create, parts, complete)
            except RuntimeError:  # the store is closing: a bucket lifecycle rule reclaims the parts
                log.debug("multipart upload of %s/%s not aborted: store closed", bucket, obj)
            raise


def _byte_views(data: bytes | memoryview | Sequence[bytes | memoryview]) -> list[memoryview]:
    """``data`` as flat byte views (one, or one per buffer of a sequence); no copy."""
    buffers = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    return [memoryview(b).cast("B") for b in buffers]


def _slices(pieces: list[memoryview], start: int, end: int) -> list[memoryview]:
    """Views of bytes ``start:end`` of the concatenation of ``pieces``; no copy."""
    out, offset = [], 0
    for piece in pieces:
        lo, hi = max(start - offset, 0), min(end - offset, len(piece))
        if lo < hi:
            out.append(piece[lo:hi])
        offset += len(piece)
    return out


class _Bodies:
    """Upload bodies, reused: at most ``keep`` idle buffers, by exact size.

    A fresh body of tens of MiB is fresh memory (page faults and the kernel zeroing every page,
    ~20 ms per 32 MiB here, on top of the copy); a reused one costs only the copy. A buffer goes
    back to the free list when its request has ended, never earlier, so a request abandoned at its
    deadline keeps its own body.
    """

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def copy(self, pieces: list[memoryview], start: int, end: int) -> bytearray:
        """Bytes ``start:end`` of the concatenation of ``pieces`` in a body of exactly that size."""
        size = end - start
        with self._lock:
            found = next((i for i, buf in enumerate(self._free) if len(buf) == size), None)
            body = self._free.pop(found) if found is not None else None
        if body is None:
            return bytearray().join(_slices(pieces, start, end))
        view, filled = memoryview(body), 0
        for piece in _slices(pieces, start, end):
            view[filled : filled + len(piece)] = piece
            filled += len(piece)
        view.release()
        return body

    def sending(self, body: bytearray, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, a request that sends ``body``; then ``body`` is free for reuse."""
        try:
            return fn(*args, **kwargs)
        finally:
            if isinstance(body, bytearray):
                with self._lock:
                    self._free.append(body)
                    del self._free[: -self._keep]  # the oldest go first


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _s3_options(opts: dict[str, Any], timeout_s: float | None, concurrency: int,
                check_read_checksums: bool = True) -> dict[str, Any]:
    """Translate the friendly S3 options into s3fs/botocore ones, with timeouts and no retries."""
    opts = dict(opts)
    client_kwargs = dict(opts.pop("client_kwargs", None) or {})
    config_kwargs = dict(opts.pop("config_kwargs", None) or {})
    region = opts.pop("region", None)
    if region is not None:
        client_kwargs.setdefault("region_name", region)
    if opts.pop("path_style", False):
        s3_conf = dict(config_kwargs.get("s3") or {})
        s3_conf.setdefault("addressing_style", "path")
        config_kwargs["s3"] = s3_conf
    if timeout_s is not None:
        config_kwargs.setdefault("connect_timeout", timeout_s)
        config_kwargs.setdefault("read_timeout", timeout_s)
    config_kwargs.setdefault("retries", {"total_max_attempts": 1})
    if not check_read_checksums:
        config_kwargs.setdefault("response_checksum_validation", "when_required")
    config_kwargs.setdefault("max_pool_connections", max(10, 4 * concurrency))
    opts.setdefault("max_concurrency", concurrency)
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    opts["config_kwargs"] = config_kwargs
    return opts


class _BlockingS3:
    """botocore's blocking S3 client with the arguments every call of this store carries."""

    def __init__(self, client: Any, extra: dict[str, str]) -> None:
        self.client = client
        self.extra = extra  # e.g. RequestPayer
        # as boto3's transfer manager does: parts carry CRC32 checksums whenever botocore would send them
        calculate = client.meta.config.request_checksum_calculation
        self.checksum = {"ChecksumAlgorithm": "CRC32"} if calculate == "when_supported" else {}

    def call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        """One request; S3 error codes become Python exceptions (``FileNotFoundError``, ``PermissionError``...)."""
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        try:
            return getattr(self.client, operation)(**kwargs)
        except ClientError as exc:
            raise translate_boto_error(exc) from None

    def upload_part(self, target: dict[str, str], upload_id: str, number: int, body: bytes) -> dict[str, Any]:
        """Upload part ``number``; the entry CompleteMultipartUpload needs for it."""
        response = self.call("upload_part", **target, UploadId=upload_id, PartNumber=number, Body=body,
                             **self.checksum)
        part = {"PartNumber": number, "ETag": response["ETag"]}
        if "ChecksumCRC32" in response:
            part["ChecksumCRC32"] = response["ChecksumCRC32"]
        return part

    def get(self, bucket: str, key: str) -> memoryview:
        """GetObject into one writable buffer of the announced length, read in ``_READ_PIECE`` pieces.

        The buffer (:func:`_read_buffer`) is not zeroed first, and each piece is copied in by numpy,
        which releases the GIL: a fresh buffer's pages are first touched (faulted in) by that copy,
        not while holding the GIL (botocore's ``readinto`` copies with ``memoryview`` slice
        assignment, which holds it; zeroing a ``bytearray`` did too). The pieces themselves land in
        1 MiB bytes objects the allocator reuses. botocore's ``read`` raises ``IncompleteReadError``
        on a short body.
        """
        response = self.call("get_object", Bucket=bucket, Key=key, **self.extra)
        out = _read_buffer(response["ContentLength"])
        filled = 0
        with response["Body"] as body:
            while filled < len(out):
                piece = body.read(min(_READ_PIECE, len(out) - filled))
                if not piece:  # botocore raises IncompleteReadError first; this is the backstop
                    raise OSError(f"s3://{bucket}/{key}: body ended after {filled} of {len(out)} bytes")
                out[filled : filled + len(piece)] = numpy.frombuffer(piece, dtype=numpy.uint8)
                filled += len(piece)
        return memoryview(out)


def _read_buffer(size: int) -> numpy.ndarray:
    """A writable, uninitialised uint8 buffer of ``size`` bytes for one object read.

    From ``_MAPPED_READ`` bytes up, a private anonymous mapping of its own (plain 4 KiB pages,
    unmapped when the last view of it goes): numpy asks for transparent huge pages at that size,
    and 32 MiB reads at 8 threads into such buffers took 1.5x the client CPU (mostly kernel time) of
    reads into these, in a process that was uploading too (benchmarks/results/s3.md). Smaller
    buffers come from numpy (the heap, reused).
    """
    if size < _MAPPED_READ:
        return numpy.empty(size, dtype=numpy.uint8)
    return numpy.frombuffer(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=numpy.uint8)


def _blocking_s3(opts: dict[str, Any]) -> _BlockingS3 | None:
    """A botocore client with the same endpoint, credentials and timeouts as the s3fs one; ``None``
    when the options carry a ready-made session it cannot share."""
    if opts.get("session") is not None:
        return None
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    config = {k: v for k, v in opts.get("config_kwargs", {}).items() if k in Config.OPTION_DEFAULTS}
    if opts.get("anon"):
        config["signature_version"] = UNSIGNED
    kwargs = dict(opts.get("client_kwargs") or {})
    for name, value in (("endpoint_url", opts.get("endpoint_url")),
                        ("aws_access_key_id", opts.get("key") or opts.get("username")),
                        ("aws_secret_access_key", opts.get("secret") or opts.get("password")),
                        ("aws_session_token", opts.get("token")),
                        ("use_ssl", opts.get("use_ssl"))):
        if value is not None:
            kwargs.setdefault(name, value)
    session = botocore.session.Session(profile=opts.get("profile"))
    # this client's responses are used for bodies, ETags, checksums and upload ids, never for dates:
    # leave timestamps (Last-Modified...) as text instead of parsing each with dateutil (~0.7 ms of
    # GIL-held CPU per GET at 8 threads here, benchmarks/results/s3.md)
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    client = session.create_client("s3", config=Config(**config), **kwargs)
    return _BlockingS3(client, {"RequestPayer": "requester"} if opts.get("requester_pays") else {})


def _abort_upload(s3: _BlockingS3, target: dict[str, str], create: cf.Future[dict[str, Any]],
                  parts: list[cf.Future[dict[str, Any]]], complete: cf.Future[dict[str, Any]] | None) -> None:
    """Abort an abandoned multipart upload once its requests still running have ended.

    Runs on the store's pool: every future it waits for was cancelled before it started or runs on
    another thread of the pool, so it cannot wait for itself.
    """
    if create.cancelled() or create.exception() is not None:
        return  # no upload was created
    cf.wait([*parts, *([complete] if complete else [])])
    if complete is not None and not complete.cancelled() and complete.exception() is None:
        return  # it completed after all (the caller had given up): the object is whole
    try:
        s3.call("abort_multipart_upload", **target, UploadId=create.result()["UploadId"])
    except Exception as exc:  # noqa: BLE001 - a bucket lifecycle rule reclaims what is left
        log.debug("abort of multipart upload %s failed: %s: %s", target["Key"], type(exc).__name__, exc)


def _atomic_local_write(path: str, data: bytes) -> None:
    """Write a temporary file beside ``path`` and rename it over ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
