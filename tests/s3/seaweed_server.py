"""A SeaweedFS server (``weed mini``) serving S3 on free loopback ports, for tests and benchmarks.

Credentials are enforced (``ACCESS_KEY`` / ``SECRET_KEY``). The server can be killed, frozen and
restarted on the same ports with the same data directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ACCESS_KEY = "testing"
SECRET_KEY = "testing-secret-7f3a"
READY_TIMEOUT_S = 60.0


def weed_binary() -> str | None:
    """The ``weed`` executable: on PATH, or beside this Python (an un-activated virtualenv)."""
    beside = Path(sys.executable).parent / "weed"
    return shutil.which("weed") or (str(beside) if beside.exists() else None)


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_pair(offset: int = 10000) -> tuple[int, int]:
    """A free port ``p`` with ``p + offset`` free too (weed's worker dials the admin at port + 10000)."""
    for _ in range(100):
        port = free_ports(1)[0]
        if port + offset > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port, port + offset
    raise RuntimeError("no free loopback port pair found")


class Seaweed:
    """A ``weed mini`` process serving S3 on ``endpoint``; credentials are enforced."""

    def __init__(self, binary: str, data_dir: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.log_path = data_dir / "weed.log"
        names = ["s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc"]
        self.ports = dict(zip(names, free_ports(len(names))))
        self.ports["admin"], self.ports["admin.grpc"] = free_port_pair()
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        p = self.ports
        return [
            self.binary, "mini", f"-dir={self.data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.autoCreateBucket=false",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}", f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin.grpc']}",
        ]

    def start(self) -> None:
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until a bucket can be created and written (the volume server has registered)."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(timeout=2)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {self.log_path}")
            try:
                try:
                    client.create_bucket(Bucket="gdscache-ready")
                except ClientError as exc:
                    if exc.response["Error"]["Code"] not in ("BucketAlreadyExists", "BucketAlreadyOwnedByYou"):
                        raise
                client.put_object(Bucket="gdscache-ready", Key="probe", Body=b"ok")
                return
            except (BotoCoreError, ClientError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS not ready after {READY_TIMEOUT_S} s; see {self.log_path}") from None
                time.sleep(0.2)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """An abrupt outage: SIGKILL the whole process group."""
        if self.running:
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def freeze(self) -> None:
        """A hung server: connections open, nothing answers."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if not self.running:
            return
        assert self.proc is not None
        self.thaw()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    def ensure_running(self) -> None:
        if self.running:
            self.thaw()
        else:
            self.start()

    def client(self, *, key: str = ACCESS_KEY, secret: str = SECRET_KEY, timeout: float = 10) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, connect_timeout=timeout, read_timeout=timeout,
                          retries={"total_max_attempts": 1}),
        )

    def options(self, **extra: Any) -> dict[str, Any]:
        """``remote_options`` for this server with explicit credentials."""
        return {"endpoint_url": self.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY, "region": "us-east-1",
                "path_style": True, **extra}
