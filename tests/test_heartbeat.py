"""Progress at least every ``HEARTBEAT_SECONDS`` in every step: a step that stays silent
past the interval gets ``step: still running, N s`` lines (through the step's sink, on
the command's standard output and in a log file alike); a quick step, or one that shows
progress of its own, gets none."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import netshrink.cli
from netshrink import heartbeat as beats
from netshrink.cli import main
from netshrink.heartbeat import heartbeat, mark_progress, marking

SHORT = 0.2  # the interval the tests use instead of 30 s


def test_a_silent_step_beats_and_a_quick_one_does_not() -> None:
    lines: list[str] = []
    with heartbeat("quick", lines.append, interval=SHORT * 5):
        time.sleep(SHORT / 4)
    assert lines == []
    with heartbeat("exporting", lines.append, interval=SHORT):
        time.sleep(SHORT * 5.5)
    assert 2 <= len(lines) <= 5, lines  # (a loaded machine may wake a beat late)
    assert all(x.startswith("exporting: still running, ") and x.endswith(" s") for x in lines)
    seen = len(lines)
    time.sleep(SHORT * 1.5)
    assert len(lines) == seen  # ended with its block


def test_progress_of_its_own_keeps_the_heartbeat_quiet() -> None:
    lines: list[str] = []
    own: list[str] = []
    say = marking(own.append)  # a caller's own sink, not a logger
    # (an interval well above the steps' spacing: a loaded machine may delay a step)
    with heartbeat("training", lines.append, interval=SHORT * 2):
        for show in (mark_progress, lambda: say("a line of its own")):  # a bar's step; a line
            end = time.monotonic() + SHORT * 3.5
            while time.monotonic() < end:
                show()
                time.sleep(SHORT / 4)
        logging.getLogger("netshrink.test").warning("a logged line of the step's own")
    assert lines == [] and own


def test_only_the_innermost_step_beats() -> None:
    lines: list[str] = []
    with (heartbeat("stage", lines.append, interval=SHORT),
          heartbeat("stage: measuring", lines.append, interval=SHORT)):
        time.sleep(SHORT * 3)
        seen = list(lines)  # (once the inner step ends, the outer may beat again)
    assert seen and all(x.startswith("stage: measuring: still running") for x in seen), seen


def test_the_default_sink_is_the_netshrink_logger(caplog: pytest.LogCaptureFixture) -> None:
    with (caplog.at_level(logging.INFO, logger="netshrink"),
          heartbeat("calibrating", interval=SHORT)):
        time.sleep(SHORT * 2)
    beats_seen = [r for r in caplog.records if "calibrating: still running" in r.message]
    assert beats_seen and beats_seen[0].name == "netshrink.heartbeat"
    assert beats_seen[0].levelno == logging.INFO


def _slow_list(args: object) -> int:
    time.sleep(SHORT * 2)
    return 0


def test_the_command_beats_on_stdout_and_in_json(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(beats, "HEARTBEAT_SECONDS", SHORT)
    monkeypatch.setattr(netshrink.cli, "cmd_list", _slow_list)  # a step with no lines
    assert main(["list"]) == 0
    assert "netshrink list: still running, " in capsys.readouterr().out
    assert main(["list", "--json-log"]) == 0
    records = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert any(r["message"].startswith("netshrink list: still running") for r in records)
    assert main(["--quiet", "list"]) == 0
    assert capsys.readouterr().out == ""
    # the command's handler and level go with it: the library is silent again
    package = logging.getLogger("netshrink")
    assert package.level == logging.NOTSET
    assert not [h for h in package.handlers if isinstance(h, logging.StreamHandler)]


def test_the_command_beats_in_a_log_file(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Output redirected to a file (``netshrink run ... > log.txt``): the lines are there."""
    monkeypatch.setattr(beats, "HEARTBEAT_SECONDS", SHORT)
    monkeypatch.setattr(netshrink.cli, "cmd_list", _slow_list)
    log_file = tmp_path / "log.txt"
    with log_file.open("w") as out:
        monkeypatch.setattr(sys, "stdout", out)
        assert main(["list"]) == 0
        monkeypatch.undo()
    assert "netshrink list: still running, " in log_file.read_text()


def test_a_silent_stage_beats_in_a_runs_log_file(tmp_path: Path, fashion_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``netshrink run ... > log.txt`` with a stage that says nothing for a while (as an
    export or NNCF does): the file gets that stage's heartbeat between its own lines."""
    from netshrink.stages.base import STAGES, load_builtin_stages

    load_builtin_stages()
    real = STAGES.get("prune.magnitude")

    def silent(model: object, cfg: object, ctx: object) -> object:
        time.sleep(SHORT * 3)
        return real.fn(model, cfg, ctx)  # type: ignore[arg-type]

    monkeypatch.setitem(STAGES._entries, "prune.magnitude", replace(real, fn=silent))
    monkeypatch.setattr(beats, "HEARTBEAT_SECONDS", SHORT)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "beat", "model": {"arch": "resnet_tiny"},
        "data": {"name": "fashion_mnist", "root": str(fashion_dir), "val_size": 0,
                 "test_limit": 32},
        "measure": {"latency": False},
        "stages": [{"kind": "prune.magnitude", "name": "quiet", "ratio": 0.5}]}))
    log_file = tmp_path / "log.txt"
    with log_file.open("w") as out:
        monkeypatch.setattr(sys, "stdout", out)
        assert main(["run", str(recipe), "--out", str(tmp_path / "o"), "--no-report",
                     "--no-cache"]) == 0
    lines = log_file.read_text().splitlines()
    start = lines.index("[1] quiet (prune.magnitude): running")
    assert re.fullmatch(r"\[1\] quiet: still running, \d+ s", lines[start + 1]), lines
