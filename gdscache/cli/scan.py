"""Walking a local-tier directory (the layout in docs/ARCHITECTURE.md) without opening a cache."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from gdscache.tiers.local import NAMESPACE_FILE, QUARANTINE, SUFFIX


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


def _entries(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_hex(name: str, length: int) -> bool:
    return len(name) == length and all(c in "0123456789abcdef" for c in name)


def namespace_dirs(root: str) -> Iterator[os.DirEntry[str]]:
    for entry in _entries(root):
        if entry.is_dir() and _is_hex(entry.name, 32):
            yield entry


def read_namespace_info(ns_dir: str) -> dict | None:
    try:
        with open(os.path.join(ns_dir, NAMESPACE_FILE)) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def iter_chunks(root: str, namespace: str | None = None) -> Iterator[ChunkFile]:
    """Every published chunk file under ``root`` (optionally one namespace), sorted by path."""
    for ns in namespace_dirs(root):
        if namespace is not None and not ns.name.startswith(namespace):
            continue
        for kk in _entries(ns.path):
            if not kk.is_dir():
                continue
            for entry in _entries(kk.path):
                name = entry.name
                if name.endswith(SUFFIX) and _is_hex(name[: -len(SUFFIX)], 32):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    yield ChunkFile(entry.path, ns.name, name[: -len(SUFFIX)], st.st_size, st.st_mtime)


def summarize(root: str) -> Summary:
    summary = Summary(root)
    by_ns: dict[str, Namespace] = {}
    for ns in namespace_dirs(root):
        by_ns[ns.name] = Namespace(ns.name, read_namespace_info(ns.path))
        for kk in _entries(ns.path):
            if kk.is_dir():
                summary.temp_files += sum(1 for e in _entries(kk.path) if e.name.endswith(".tmp"))
    for chunk in iter_chunks(root):
        by_ns[chunk.namespace].add(chunk)
    summary.namespaces = list(by_ns.values())
    for entry in _entries(os.path.join(root, QUARANTINE)):
        try:
            summary.quarantined_bytes += entry.stat().st_size
            summary.quarantined_files += 1
        except FileNotFoundError:
            pass
    return summary
