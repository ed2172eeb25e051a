"""netshrink logs like a library: its progress goes to the ``netshrink`` loggers, so a
caller who configures nothing sees nothing, ``caplog`` (or ``logging.basicConfig``) sees
the lines, and a caller's own ``log=`` sink still gets them. (The command prints them:
``test_progress_log``, ``test_heartbeat``.)"""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import torch

import netshrink
from custom_models import make_mobile
from netshrink.api.data import as_split
from netshrink.bench import MeasureOptions, measure
from netshrink.prune.blocks import BlockPruneConfig, prune_blocks

SRC = Path(netshrink.__file__).parent
QUICK = MeasureOptions(warmup=0, latency_runs=1, throughput_warmup=0, throughput_runs=1,
                       min_seconds=None, batch_size=2, memory=False, noisy_retries=0)


def _model_and_val() -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A small network with residual blocks, and a few validation images to scan on."""
    torch.manual_seed(0)
    return make_mobile(), [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]


def test_the_library_prints_nothing_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    model, val = _model_and_val()
    # a verb that logs its scan, and a measurement
    pruned = netshrink.prune(model, BlockPruneConfig(count=1), val=val,
                             example_input=val[0][0][:1])
    measure(pruned.module, input_shape=[1, 28, 28], options=QUICK)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_caplog_sees_netshrink_records_and_a_sink_gets_its_own(
        caplog: pytest.LogCaptureFixture) -> None:
    model, val = _model_and_val()
    with caplog.at_level(logging.INFO, logger="netshrink"):
        netshrink.prune(model, BlockPruneConfig(count=1), val=val,
                        example_input=val[0][0][:1])
        [scan] = [r for r in caplog.records if r.message.startswith("block scan 1/1")]
        assert scan.name.startswith("netshrink.") and scan.levelno == logging.INFO
        assert scan.module == "blocks"  # the module that wrote the line, not a wrapper
        caplog.clear()
        lines: list[str] = []
        prune_blocks(model, BlockPruneConfig(count=1), as_split(val, "val"), log=lines.append,
                     input_shape=[1, 28, 28])
    assert [x for x in lines if x.startswith("block scan 1/1")]
    assert not [r for r in caplog.records if r.message.startswith("block scan")]  # not both


def test_the_package_logger_has_a_null_handler() -> None:
    handlers = logging.getLogger("netshrink").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
    # nothing that prints: the last-resort handler is never reached either
    assert not any(isinstance(h, logging.StreamHandler) for h in handlers)


def _print_defaults(tree: ast.AST) -> list[int]:
    """Lines where a parameter or a dataclass field defaults to ``print``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defaults = node.args.defaults + [d for d in node.args.kw_defaults if d]
            found += [d.lineno for d in defaults
                      if isinstance(d, ast.Name) and d.id == "print"]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Name):
            found += [node.lineno] if node.value.id == "print" else []
    return found


def test_no_library_function_defaults_to_print() -> None:
    """The command's own modules print its results; the library's take a sink."""
    offenders = [f"{path.relative_to(SRC)}:{line}" for path in sorted(SRC.rglob("*.py"))
                 if "cli" not in path.relative_to(SRC).parts
                 for line in _print_defaults(ast.parse(path.read_text()))]
    assert offenders == []


def test_study_workers_print_only_where_the_caller_shows_progress() -> None:
    """A worker process has none of the caller's handlers: it prints its cells' lines
    itself, and only when the caller's netshrink loggers show INFO lines (the command
    without --quiet; a script with logging configured)."""
    from netshrink.study.dispatch import _echo

    package = logging.getLogger("netshrink")
    level = package.level
    try:
        assert not _echo()  # nothing configured (the root logger's WARNING)
        package.setLevel(logging.INFO)
        assert _echo()
    finally:
        package.setLevel(level)
