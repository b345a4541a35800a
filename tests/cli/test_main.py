"""The console script itself: --version, --help, bad usage."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import gdscache
from gdscache.cli.main import main

SCRIPT = os.path.join(os.path.dirname(sys.executable), "gdscache")


def test_console_script_version_and_bad_subcommand():
    done = subprocess.run([SCRIPT, "--version"], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert done.stdout.strip() == f"gdscache {gdscache.__version__}"
    bad = subprocess.run([SCRIPT, "frobnicate"], check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "invalid choice: 'frobnicate'" in bad.stderr


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("bench", "ls", "stats", "verify", "gc", "calibrate"):
        assert name in out


def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("sub", ["ls", "stats", "verify", "gc"])
def test_missing_path_is_a_clear_error(tmp_path, capsys, sub):
    extra = ["--max-size", "1GB"] if sub == "gc" else []
    assert main([sub, str(tmp_path / "nope"), *extra]) == 2
    err = capsys.readouterr().err
    assert f"gdscache {sub}: error:" in err and "no such directory" in err
