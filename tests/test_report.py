"""The report: rendered from run.json alone, deterministic, self-contained, atomic."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from netshrink.errors import UserError
from netshrink.report import build_content, load_run, render_markdown, render_report
from netshrink.report.plots import pareto_front
from netshrink.store.atomic import atomic_write_bytes, atomic_write_text, atomic_writer
from report_records import compared, make_record, table_rows, write_run


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One full render (plots included) shared by the tests that only read it."""
    run_dir = write_run(tmp_path_factory.mktemp("run"), make_record())
    md, html = render_report(run_dir)
    return run_dir, md, html


def test_render_writes_markdown_html_and_plots(rendered: tuple[Path, Path, Path]) -> None:
    run_dir, md, html = rendered
    assert md == run_dir / "report.md" and md.is_file()
    assert html == run_dir / "report.html" and html.is_file()
    pngs = sorted(p.name for p in (run_dir / "report_files").glob("*.png"))
    assert pngs == [
        "latency_vs_accuracy.png",
        "size_vs_accuracy.png",
        "top1.png",
        "training.png",
    ]
    text = md.read_text(encoding="utf-8")
    for name in pngs:
        assert f"](report_files/{name})" in text
        assert (run_dir / "report_files" / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_html_is_self_contained(rendered: tuple[Path, Path, Path]) -> None:
    page = rendered[2].read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script\b", page, re.IGNORECASE)
    assert not re.search(r"<link\b", page, re.IGNORECASE)
    assert "@import" not in page and "url(" not in page
    # Every src/href is a data: URI.
    for ref in re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page):
        assert ref.startswith("data:image/png;base64,")
    assert len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)) == 4
    assert "<title>netshrink report: lenet-mnist</title>" in page
    for name in ("baseline", "prune_quant", "finetune", "not smaller, not faster"):
        assert name in page


def test_verdicts_and_ratios_in_the_right_rows(rendered: tuple[Path, Path, Path]) -> None:
    text = rendered[1].read_text(encoding="utf-8")
    rows = table_rows(text, compared())
    assert list(rows) == ["baseline", "prune_quant", "finetune"]  # baseline first

    base, small, same = rows["baseline"], rows["prune_quant"], rows["finetune"]
    assert base["verdict"] == "reference"
    assert small["verdict"] == "smaller, faster, accuracy within budget"
    assert same["verdict"] == "not smaller, not faster, accuracy within budget"

    assert base["size (vs reference)"] == "40.0 MB (1.00x)"
    assert small["size (vs reference)"] == "10.0 MB (4.00x)"
    assert same["size (vs reference)"] == "39.8 MB (1.01x)"
    assert small["CPU latency b1 p50 / p90 ms (speedup)"] == "10.00 / 10.80 (2.00x)"
    assert small["CPU throughput img/s @ batch (ratio)"] == "320 @ 64 (2.00x)"
    assert base["top-1 %"] == "95.12" and small["top-1 %"] == "94.71 (-0.41)"
    assert small["non-zero params"] == "5.00 M (50.0%)"
    assert base["MACs"] == "400.0 M"
    assert small["stage time"] == "2 min 10 s"

    # The headline speaks of the final stage, and the thresholds are stated. A 1.03x p50
    # is under the threshold: the headline does not call it faster, it gives both figures.
    assert ("**Final stage finetune: 1.01x smaller than baseline, not faster (latency 1.03x, "
            "throughput 1.03x), +0.18 points top-1") in text
    assert "≥ 1.02" in text and "≥ 1.05" in text


def test_environment_shown_once_and_differences_per_stage(
    rendered: tuple[Path, Path, Path],
) -> None:
    text = rendered[1].read_text(encoding="utf-8")
    assert "- torch: 2.13.0+cpu" in text and "- threads: 2" in text
    assert "Measured on (every stage): cpu AMD EPYC 9R14" in text
    assert "Differs per stage: precision" in text
    per_stage = table_rows(text, "Environment")  # the per-stage table lives under it
    assert per_stage["prune_quant"]["precision"] == "int8"
    assert per_stage["baseline"]["precision"] == "fp32"


def test_history_tables(rendered: tuple[Path, Path, Path]) -> None:
    text = rendered[1].read_text(encoding="utf-8")
    assert "### Training history: prune\\_quant" not in text  # "_" is not escaped
    assert "### Training history: prune_quant" in text
    assert "| 1 | 0.9000 | 91.00 | 91.80 | 0.1 | 43.5 s |" in text
    assert "| 2 | 0.2500 | 92.00 | 92.60 | 0.01 | 44.5 s |" in text


def test_rendering_twice_is_identical(rendered: tuple[Path, Path, Path]) -> None:
    run_dir, md, html = rendered
    before = {p: p.read_bytes() for p in (md, html, *sorted(run_dir.glob("report_files/*")))}
    render_report(run_dir)
    after = {p: p.read_bytes() for p in before}
    assert before == after
    assert "2025-01-02T04:05:06+00:00" in md.read_text(encoding="utf-8")  # the run's date
    assert not list(run_dir.rglob("*.tmp"))


def test_accuracy_below_budget() -> None:
    rows = table_rows(
        render_markdown(build_content(make_record(budget=0.2), with_plots=False)),
        compared(),
    )
    assert rows["prune_quant"]["verdict"] == "smaller, faster, accuracy below budget"
    assert rows["finetune"]["verdict"] == "not smaller, not faster, accuracy within budget"


def test_no_budget_and_missing_fields(tmp_path: Path) -> None:
    record = make_record(budget=None)
    base = record.stages[0].measurement
    assert base is not None
    odd = "<b>x</b> | & $y"
    record.stages[1].name = odd
    record.stages[1].measurement = base.model_copy(
        update={"latency": None, "throughput": None, "macs": None, "size_bytes": None}
    )
    record.stages[0].measurement = base.model_copy(update={"latency": None})
    record.stages[2].measurement = None
    record.stages[2].status = "failed"
    md, html = render_report(write_run(tmp_path / "run", record))

    rows = table_rows(md.read_text(encoding="utf-8"), compared())
    assert rows[odd]["verdict"] == "size unknown, latency unknown"
    assert rows[odd]["MACs"] == "–" and rows[odd]["size (vs reference)"] == "–"
    assert rows["finetune"]["verdict"] == "failed"
    assert rows["finetune"]["top-1 %"] == "–"
    assert rows["baseline"]["CPU latency b1 p50 / p90 ms (speedup)"] == "–"
    # No stage has a latency: that plot is skipped, the others are not.
    names = {p.name for p in (tmp_path / "run" / "report_files").glob("*.png")}
    assert "latency_vs_accuracy.png" not in names and "top1.png" in names

    page = html.read_text(encoding="utf-8")
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt; | &amp; $y" in page


def test_run_without_stages_renders(tmp_path: Path) -> None:
    record = make_record()
    record.stages = []
    md, html = render_report(write_run(tmp_path / "run", record))
    text = md.read_text(encoding="utf-8")
    assert "**No stages recorded yet" in text and "No stage has a measurement yet." in text
    assert "<h2>Plots</h2>" not in html.read_text(encoding="utf-8")
    assert not list((tmp_path / "run" / "report_files").glob("*.png"))


def test_stale_plots_are_removed_and_the_users_files_kept(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", make_record())
    render_report(run_dir)  # with training histories: a plot of them
    before = {p.name for p in (run_dir / "report_files").glob("*.png")}
    mine = run_dir / "report_files" / "my_figure.png"
    mine.write_bytes(b"\x89PNG")
    record = make_record()
    for stage in record.stages:
        stage.history = []
    render_report(write_run(run_dir, record))
    names = sorted(p.name for p in (run_dir / "report_files").glob("*.png"))
    assert names == ["latency_vs_accuracy.png", "my_figure.png", "size_vs_accuracy.png",
                     "top1.png"]
    assert before - set(names)  # a plot of the first render had no data the second time


def test_missing_run_dir_or_json_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no run\.json; run `netshrink run RECIPE --out"):
        load_run(tmp_path / "nope")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(UserError, match=r"no run\.json"):
        render_report(tmp_path / "empty")


def test_corrupt_json_is_a_user_error(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", make_record())
    text = (run_dir / "run.json").read_text(encoding="utf-8")
    (run_dir / "run.json").write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(UserError, match=r"run\.json: not valid JSON: .* line \d+ column \d+"):
        load_run(run_dir)
    assert not (run_dir / "report.md").exists()


def test_schema_error_names_file_and_first_problem(tmp_path: Path) -> None:
    data = json.loads(make_record().model_dump_json())
    del data["stages"][1]["measurement"]["params"]
    data["stages"][2]["bogus"] = 1
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_run(run_dir)
    message = str(info.value)
    assert str(run_dir / "run.json") in message
    assert "stages.1.measurement.params: Field required (1 more)" in message


def test_load_run_round_trips(tmp_path: Path) -> None:
    record = make_record()
    assert load_run(write_run(tmp_path, record)) == record


def test_pareto_front() -> None:
    # (size, top1): c is beaten by b (smaller and more accurate); d ties a on size.
    points = [(40.0, 95.0), (10.0, 94.5), (12.0, 94.0), (40.0, 94.9), (5.0, 90.0)]
    assert pareto_front(points) == [4, 1, 0]


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "one\n")
    atomic_write_text(target, "two\nlines\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert target.read_bytes() == b"two\nlines\n"  # no newline translation
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "out.txt"]


def test_failing_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "report.md"
    atomic_write_text(target, "old report\n")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_writer(target) as handle:
        handle.write(b"half a new rep")
        raise RuntimeError("disk on fire")
    assert target.read_text(encoding="utf-8") == "old report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]

    # A write into a folder that does not exist fails before touching anything.
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "x.txt", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
