"""GPU tests: everything here is marked ``gpu`` and skipped cleanly where CUDA is absent."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/gpu/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device and driver"))


@pytest.fixture
def kvikio_backend():
    """A KvikioBackend; kvikio is only imported once CUDA is known to be present. kvikio's compat mode, which a
    backend may set for the whole process, is put back after."""
    pytest.importorskip("kvikio")
    import kvikio.defaults

    from io_backends.kvikio_backend import KvikioBackend

    compat_mode = kvikio.defaults.get("compat_mode")
    backend = KvikioBackend(threads=4)
    yield backend
    backend.close()
    kvikio.defaults.set({"compat_mode": compat_mode})
