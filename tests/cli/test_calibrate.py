"""`gdscache calibrate`: argument checks, the lazy import, and the call it makes."""

from __future__ import annotations

import sys
import types

import pytest

from gdscache.cli.main import main


@pytest.fixture
def inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    text = tmp_path / "text.txt"
    text.write_text("some calibration text")
    return model, text, tmp_path / "profile.json"


def test_calibrate_passes_its_arguments(inputs, monkeypatch):
    model, text, out = inputs
    calls = []
    fake = types.ModuleType("gdscache.calibrate")
    fake.calibrate = lambda *args, **kwargs: calls.append((args, kwargs))
    monkeypatch.setitem(sys.modules, "gdscache.calibrate", fake)
    argv = ["calibrate", str(model), "--text", str(text), "--text", str(text), "--out", str(out),
            "--gguf-file", "m.gguf", "--target-kl", "0.002", "--windows", "3"]
    assert main(argv) == 0
    assert calls == [((str(model), [str(text), str(text)], str(out)),
                      {"gguf_file": "m.gguf", "target_kl": 0.002, "windows": 3})]


def test_calibrate_missing_module_is_a_clear_error(inputs, monkeypatch, capsys):
    model, text, out = inputs
    monkeypatch.setitem(sys.modules, "gdscache.calibrate", None)  # makes the import raise ImportError
    assert main(["calibrate", str(model), "--text", str(text), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "calibration is unavailable" in err and "gdscache.calibrate" in err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "missing"}, "no such model directory"),
        ({"text": "missing.txt"}, "no such file"),
        ({"out": "nodir/profile.json"}, "does not exist"),
        ({"extra": ["--windows", "0"]}, "--windows must be >= 1"),
    ],
)
def test_calibrate_bad_arguments(inputs, capsys, change, message):
    model, text, out = inputs
    model = model.parent / change["model"] if "model" in change else model
    text = text.parent / change["text"] if "text" in change else text
    out = out.parent / change["out"] if "out" in change else out
    assert main(["calibrate", str(model), "--text", str(text), "--out", str(out), *change.get("extra", [])]) == 2
    assert message in capsys.readouterr().err


def test_calibrate_requires_text_and_out(inputs, capsys):
    model, _, _ = inputs
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", str(model)])
    assert exc.value.code == 2
    assert "--text" in capsys.readouterr().err
