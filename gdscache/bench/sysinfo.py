"""Where a benchmark ran: filesystem, device, machine."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import socket

import torch


def _unescape_mount(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_of(path: str, mounts_file: str = "/proc/mounts") -> dict[str, str]:
    """The mount holding ``path``: ``{"fstype", "mount_point", "source"}`` (longest matching mount point)."""
    real = os.path.realpath(path)
    best = {"fstype": "unknown", "mount_point": "", "source": ""}
    try:
        with open(mounts_file) as f:
            lines = f.read().splitlines()
    except OSError:
        return best
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        source, mount_point, fstype = (_unescape_mount(x) for x in fields[:3])
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best["mount_point"]):
            best = {"fstype": fstype, "mount_point": mount_point, "source": source}
    return best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:N]``; ``cuda`` without a usable GPU is a clear error."""
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: no usable CUDA device (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda or 'none'}); use --device cpu"
            )
        return torch.device(name)
    raise ValueError(f"--device must be 'cpu' or 'cuda', got {name!r}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def describe(path: str, device: torch.device, command: str | None = None) -> dict[str, object]:
    """Machine facts recorded with every benchmark result."""
    from gdscache import __version__

    usage = shutil.disk_usage(path)
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "command": command,
        "gdscache_version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "device_name": device_name(device),
        "path": os.path.realpath(path),
        "filesystem": filesystem_of(path),
        "disk_free_bytes": usage.free,
        "load_average_start": os.getloadavg(),
    }
