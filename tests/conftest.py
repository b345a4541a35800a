"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

from gdscache.config import NOT_FIELDS


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "kv"
    d.mkdir()
    return str(d)


@pytest.fixture(autouse=True)
def _no_gdscache_env(monkeypatch):
    """Tests set their config explicitly; a developer's GDSCACHE_* variables must not leak in."""
    for name in list(os.environ):
        if name.startswith("GDSCACHE_") and name not in NOT_FIELDS:
            monkeypatch.delenv(name)
