"""``benchmarks/gpu_check.sh``'s ``cufile`` step, here without a GPU: the udev entry it gives cuFile while it runs, and
that it removes exactly what it made (on the lent machines it runs as root, in ``/run/udev``). The GPU tests and
benchmarks it runs are replaced by stand-ins that record their calls; everything else is the step as written."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def _function(name: str) -> str:
    text = SCRIPT.read_text()
    start = text.index(f"{name}() {{")
    return text[start : text.index("\n}\n", start) + 3]


def _run_step(tmp_path: pathlib.Path, udev: pathlib.Path) -> tuple[subprocess.CompletedProcess[str], str]:
    repo, calls = tmp_path / "repo", tmp_path / "calls"
    repo.mkdir(exist_ok=True)
    calls.touch()
    stand_ins = f"""
python3() {{  # the step's GPU test and benchmark: record the call and the udev entry as they see it
    case "$1" in
        -m | benchmarks/*) echo "python3 $*" >> {calls}; cat "$UDEV_DIR"/data/b* >> {calls} ;;
        *) command python3 "$@" ;;
    esac
}}
issue3_bench() {{ echo "issue3_bench $KVIKIO_COMPAT_MODE $*" >> {calls}; }}
"""
    env = {**os.environ, "REPO": str(repo), "OUT": str(tmp_path / "out"), "UDEV_DIR": str(udev)}
    done = subprocess.run(["bash", "-c", _function("step_cufile") + stand_ins + "step_cufile"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    return done, calls.read_text()


def _device_of(path: pathlib.Path) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


@pytest.mark.parametrize("existing", [(), ("udev",), ("udev", "udev/data")])
def test_cufile_step_gives_cufile_its_udev_entry_and_removes_what_it_made(tmp_path, existing) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for folder in existing:
        (run / folder).mkdir()
    done, calls = _run_step(tmp_path, run / "udev")
    assert done.returncode == 0, done.stderr
    lines = calls.splitlines()
    assert lines.count("E:ID_FS_USAGE=filesystem") == 2  # the entry was there for the test and the benchmark
    fs_types = [line.removeprefix("E:ID_FS_TYPE=") for line in lines if line.startswith("E:ID_FS_TYPE=")]
    assert len(fs_types) == 2 and (all(fs_types) or not shutil.which("findmnt"))  # the filesystem's type, as mounted
    assert [line.split()[:2] for line in lines if line.startswith("issue3_bench")] == [
        ["issue3_bench", "OFF"], ["issue3_bench", "ON"], ["issue3_bench", "OFF"], ["issue3_bench", "ON"]]
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == sorted(existing)


def test_cufile_step_leaves_an_existing_entry_alone(tmp_path) -> None:
    (tmp_path / "repo" / ".bench").mkdir(parents=True)
    data = tmp_path / "run" / "udev" / "data"
    data.mkdir(parents=True)
    entry = data / f"b{_device_of(tmp_path / 'repo' / '.bench')}"
    entry.write_text("E:ID_FS_TYPE=xfs\nE:ID_FS_USAGE=filesystem\n")
    done, calls = _run_step(tmp_path, tmp_path / "run" / "udev")
    assert done.returncode == 0, done.stderr
    assert "E:ID_FS_TYPE=xfs" in calls
    assert entry.read_text() == "E:ID_FS_TYPE=xfs\nE:ID_FS_USAGE=filesystem\n"


def test_cufile_step_stops_where_it_cannot_write_the_entry(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done, calls = _run_step(tmp_path, blocker / "udev")
    assert done.returncode != 0
    assert calls == ""  # nothing measured without the entry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calls", "file", "repo"]
