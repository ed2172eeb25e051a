"""The report's reference: every ratio, verdict, headline and plot is against one stage, the
recipe's ``report.baseline`` or by default the first evaluated one (the trained teacher
of a recipe that starts from a fresh, untrained init, which is only counted and sized)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from netshrink.errors import UserError
from netshrink.report import build_content, render_markdown, render_report
from report_records import (
    compared,
    gpu_record,
    make_pruning_run,
    make_quickstart_record,
    table_rows,
    write_run,
)

LATENCY = "CPU latency b1 p50 / p90 ms (speedup)"
SIZE = "size (vs reference)"


def _markdown(report: dict | None = None) -> str:
    return render_markdown(build_content(make_quickstart_record(report), with_plots=False))


def _alts(html: str) -> dict[str, str]:
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", html)
    return {c.split(":")[0].split(";")[0]: c for c in captions}


def test_default_reference_is_the_trained_teacher() -> None:
    text = _markdown()
    rows = table_rows(text, compared("train"))
    assert list(rows) == ["baseline", "train", "kd", "prune", "int8"]  # all rows, in order
    base, teacher, student, int8 = rows["baseline"], rows["train"], rows["kd"], rows["int8"]

    # The untrained start shows what was measured, and no comparison.
    assert base["verdict"] == "untrained start (not evaluated)"
    assert base[SIZE] == "100.0 MB" and base["params"] == "25.00 M"
    assert base["top-1 %"] == "–" and base[LATENCY] == "–"

    assert teacher["verdict"] == "reference"
    assert teacher[SIZE] == "100.0 MB (1.00x)" and teacher["top-1 %"] == "93.00"
    assert student[SIZE] == "40.0 MB (2.50x)"
    assert student[LATENCY] == "16.00 / 17.28 (2.50x)"
    assert student["top-1 %"] == "92.50 (-0.50)"
    assert student["verdict"] == "smaller, faster, accuracy within budget"
    assert int8[SIZE] == "5.0 MB (20.00x)" and int8["top-1 %"] == "91.80 (-1.20)"
    assert int8["verdict"] == "smaller, faster, accuracy below budget"

    assert ("**Final stage int8: 20.0x smaller, 8.0x faster than train, -1.20 points top-1 "
            "(verdict: smaller, faster, accuracy below budget; speed: both in eager torch, from "
            "each stage's own timing, not side by side).**") in text
    assert "Reference: train, the first stage with a measured accuracy (baseline not " \
           "evaluated)" in text
    assert '"smaller" needs train size / stage size ≥ 1.02' in text
    assert "Accuracy budget: 1 points of top-1 below train." in text
    assert "ratios in brackets are against train" in text
    # The untrained start was not timed: no like-for-like warning about it.
    assert "not like-for-like" not in text and "other device's columns" not in text


def test_explicit_reference_names_another_stage() -> None:
    text = _markdown({"accuracy_budget": 1.0, "baseline": "kd"})
    rows = table_rows(text, compared("kd"))
    assert rows["kd"]["verdict"] == "reference"
    assert rows["baseline"]["verdict"] == "untrained start (not evaluated)"
    # A stage before the reference with an accuracy is compared like any other.
    assert rows["train"][SIZE] == "100.0 MB (0.40x)"
    assert rows["train"]["top-1 %"] == "93.00 (+0.50)"
    # 2.5x the latency and 0.4x the throughput of kd: slower, not merely "not faster".
    assert rows["train"]["verdict"] == "not smaller, slower, accuracy within budget"
    assert rows["int8"][SIZE] == "5.0 MB (8.00x)"
    assert rows["int8"][LATENCY] == "5.00 / 5.40 (3.20x)"
    assert rows["int8"]["verdict"] == "smaller, faster, accuracy within budget"
    assert "**Final stage int8: 8.0x smaller, 3.2x faster than kd, -0.70 points top-1" in text
    assert "Reference: kd (recipe \\`report.baseline\\`)" in text


def test_explicit_baseline_that_was_not_evaluated() -> None:
    text = _markdown({"baseline": "baseline"})
    rows = table_rows(text, compared("baseline"))
    assert rows["baseline"]["verdict"] == "reference"
    assert rows["train"][SIZE] == "100.0 MB (1.00x)"
    assert rows["train"]["top-1 %"] == "93.00"  # nothing to subtract
    assert rows["train"][LATENCY] == "40.00 / 43.20"  # the reference was not timed
    assert "It has no measured accuracy" in text


def test_reference_not_measured_yet_falls_back_with_a_note() -> None:
    record = make_quickstart_record({"baseline": "int8"})
    record.stages = record.stages[:3]  # a run in progress: int8 not reached yet
    text = render_markdown(build_content(record, with_plots=False))
    assert table_rows(text, compared("train"))["train"]["verdict"] == "reference"
    assert ("recipe \\`report.baseline\\` names int8, which has no measurement yet (the run "
            "is in progress, or that stage failed), so the report compares with train") in text
    assert "**Final stage kd: 2.5x smaller, 2.5x faster than train" in text


def test_only_the_untrained_start_measured() -> None:
    record = make_quickstart_record()
    record.stages = record.stages[:1]
    text = render_markdown(build_content(record, with_plots=False))
    assert table_rows(text, compared("baseline"))["baseline"]["verdict"] == "reference"
    assert "**No stage after the reference (baseline) has been measured yet.**" in text


def test_reference_that_is_not_a_name_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"report\.baseline must be a stage name, got 3"):
        build_content(make_quickstart_record({"baseline": 3}), with_plots=False)


def test_plots_mark_the_reference(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", make_quickstart_record())
    _, html = render_report(run_dir)
    page = html.read_text(encoding="utf-8")
    # Grey like the reference, not red like a failed check.
    assert '<span class="base">untrained start (not evaluated)</span>' in page
    assert '<span class="base">reference</span>' in page
    alts = _alts(page)
    assert alts["Top-1 per stage"].endswith("change vs train (the reference)")
    assert "baseline" not in alts["Top-1 per stage"]  # not evaluated: no bar
    assert "; reference: train" in alts["Size on disk vs top-1"]
    # x is against the stage's own input, the ResNet-18 student (5 M of its 10 M left),
    # not the ResNet-50 teacher's 25 M: the distillation is no pruning.
    pruned = alts["Top-1 vs fraction pruned"]
    assert ("each stage against the model it started from; prune 50.0% removed from kd, "
            "top-1 92.20%") in pruned
    assert "80.0%" not in pruned


def test_same_device_ratios_against_a_chosen_reference() -> None:
    record = gpu_record()
    record.recipe["report"] = {"accuracy_budget": 1.0, "baseline": "pruned"}
    content = build_content(record, with_plots=False)
    rows = table_rows(render_markdown(content), compared("pruned"))
    # The baseline, before the reference and on its device, is compared with it.
    assert rows["baseline"]["GPU latency b1 p50 / p90 ms (speedup)"] == "2.00 / 2.16 (0.50x)"
    assert rows["int8"]["CPU latency b1 p50 / p90 ms (speedup)"] == "8.00 / 8.64"
    assert rows["int8"]["verdict"] == (
        "not smaller, speed not comparable (other device), accuracy within budget")
    assert any(n.startswith("int8 was measured on cpu, the reference (pruned) on cuda")
               for n in content.notes)


def test_weights_against_the_reference_fraction_pruned_against_the_input(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    record = make_pruning_run(run_dir)
    record.recipe["report"] = {"accuracy_budget": 1.0, "baseline": "channels"}
    write_run(run_dir, record)
    alts = _alts(render_report(run_dir)[1].read_text(encoding="utf-8"))
    # "before" is the reference's file (4 channels: 36 + 144 + 40 conv/linear weights):
    # narrower than the magnitude stage's, the same layers (one architecture).
    weights = alts["Conv/linear weights"]
    assert "channels vs magnitude" in weights
    assert "of 220 weights before" in weights
    pruned = alts["Top-1 vs fraction pruned"]
    # whatever the reference, a stage's fraction is of the model it pruned
    assert "magnitude 50.0% removed from baseline" in pruned
    assert "channels 75.0% removed from baseline" in pruned
