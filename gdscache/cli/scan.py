"""Walking a local-tier directory (the layout in docs/ARCHITECTURE.md) without opening a cache."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from gdscache.tiers.local import (
    NAMESPACE_FILE,
    QUARANTINE,
    chunk_key_hex,
    iter_entries,
    namespace_dirs,
    scandir_sorted,
)


@dataclass(frozen=True)
class ChunkFile:
    path: str
    namespace: str
    key: str
    size: int
    mtime: float


@dataclass
class Namespace:
    """One fingerprint directory: what ``namespace.json`` says, and the chunks under it."""

    hex: str
    info: dict | None
    chunks: int = 0
    bytes: int = 0
    oldest: float | None = None
    newest: float | None = None

    def add(self, chunk: ChunkFile) -> None:
        self.chunks += 1
        self.bytes += chunk.size
        self.oldest = chunk.mtime if self.oldest is None else min(self.oldest, chunk.mtime)
        self.newest = chunk.mtime if self.newest is None else max(self.newest, chunk.mtime)


@dataclass
class Summary:
    root: str
    namespaces: list[Namespace] = field(default_factory=list)
    temp_files: int = 0
    quarantined_files: int = 0
    quarantined_bytes: int = 0

    @property
    def chunks(self) -> int:
        return sum(ns.chunks for ns in self.namespaces)

    @property
    def bytes(self) -> int:
        return sum(ns.bytes for ns in self.namespaces)


def cache_root(path: str) -> str:
    """``path`` as an absolute directory, or a ValueError that names it."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        raise ValueError(f"{path}: no such directory")
    if not os.path.isdir(full):
        raise ValueError(f"{path}: not a directory")
    return full


def read_namespace_info(ns_dir: str) -> dict | None:
    try:
        with open(os.path.join(ns_dir, NAMESPACE_FILE)) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def iter_chunks(root: str, namespace: str | None = None) -> Iterator[ChunkFile]:
    """Every published chunk file under ``root`` (optionally one namespace), sorted by path."""
    for ns, entry in iter_entries(root):
        if namespace is None or ns.startswith(namespace):
            chunk = _chunk_file(ns, entry)
            if chunk is not None:
                yield chunk


def _chunk_file(ns: str, entry: os.DirEntry[str]) -> ChunkFile | None:
    key = chunk_key_hex(entry.name)
    if key is None:
        return None
    try:
        st = entry.stat()
    except FileNotFoundError:
        return None
    return ChunkFile(entry.path, ns, key, st.st_size, st.st_mtime)


def summarize(root: str) -> Summary:
    summary = Summary(root)
    by_ns: dict[str, Namespace] = {}
    for ns in namespace_dirs(root):
        by_ns[ns.name] = Namespace(ns.name, read_namespace_info(ns.path))
    for ns, entry in iter_entries(root):  # one pass: temporaries and chunks
        if entry.name.endswith(".tmp"):
            summary.temp_files += 1
        elif (chunk := _chunk_file(ns, entry)) is not None:
            by_ns[ns].add(chunk)
    summary.namespaces = list(by_ns.values())
    for entry in scandir_sorted(os.path.join(root, QUARANTINE)):
        try:
            summary.quarantined_bytes += entry.stat().st_size
            summary.quarantined_files += 1
        except FileNotFoundError:
            pass
    return summary
