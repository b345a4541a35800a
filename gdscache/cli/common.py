"""Helpers shared by the subcommands: errors, sizes and times for humans, JSON output."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

from rich.console import Console


class CLIError(Exception):
    """A problem the user can fix; printed without a traceback. ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def human_iso(iso: str | None) -> str:
    return "-" if iso is None else human_time(dt.datetime.fromisoformat(iso).timestamp())


def iso_time(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def out_console() -> Console:
    """Console for results on stdout: the terminal's width, or 160 columns when redirected to a file."""
    return Console(width=None if sys.stdout.isatty() else 160)
