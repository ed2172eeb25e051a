"""Speed and memory columns per device: GPU columns only when a stage was measured on a GPU,
and ratios only against a reference measured on the same device (synthetic records: no GPU
is needed to check what the report says about one)."""

from __future__ import annotations

import re
from pathlib import Path

from netshrink.report import build_content, render_html, render_markdown, render_report
from report_records import (
    compared,
    gpu_record,
    gpu_record_with_cpu_timings,
    make_record,
    table_rows,
    write_run,
)

COMPARED = compared()


def test_gpu_columns_and_same_device_ratios() -> None:
    rows = table_rows(render_markdown(build_content(gpu_record(), with_plots=False)), COMPARED)
    pruned, int8 = rows["pruned"], rows["int8"]
    assert pruned["GPU latency b1 p50 / p90 ms (speedup)"] == "1.00 / 1.08 (2.00x)"
    assert pruned["GPU throughput img/s @ batch (ratio)"] == "3,200 @ 64 (2.00x)"
    assert pruned["GPU peak memory MiB (reserved) (ratio)"] == "400.0 (2.00x)"
    assert pruned["CPU latency b1 p50 / p90 ms (speedup)"] == "–"
    assert pruned["verdict"] == "smaller, faster, accuracy within budget"
    # Timed on the CPU against a GPU baseline: shown, in the CPU columns, with no ratio.
    assert int8["CPU latency b1 p50 / p90 ms (speedup)"] == "8.00 / 8.64"
    assert int8["CPU process peak RSS MiB"] == "310.5"
    assert int8["GPU latency b1 p50 / p90 ms (speedup)"] == "–"
    assert int8["verdict"] == "smaller, speed not comparable (other device), accuracy within budget"


def test_cpu_timings_of_gpu_stages_give_cpu_runtimes_their_ratios() -> None:
    record = gpu_record_with_cpu_timings()
    rows = table_rows(render_markdown(build_content(record, with_plots=False)), COMPARED)
    base, pruned, int8 = rows["baseline"], rows["pruned"], rows["int8"]
    # GPU figures and ratios as before; the CPU timings in the CPU columns, with ratios
    # against the reference's CPU timing.
    assert pruned["GPU latency b1 p50 / p90 ms (speedup)"] == "1.00 / 1.08 (2.00x)"
    assert base["CPU latency b1 p50 / p90 ms (speedup)"] == "16.00 / 17.28 (1.00x)"
    assert pruned["CPU latency b1 p50 / p90 ms (speedup)"] == "10.00 / 10.80 (1.60x)"
    assert int8["CPU latency b1 p50 / p90 ms (speedup)"] == "8.00 / 8.64 (2.00x)"
    assert int8["CPU throughput img/s @ batch (ratio)"].endswith("(2.00x)")
    assert int8["verdict"] == "smaller, faster, accuracy within budget"
    assert pruned["verdict"] == "smaller, faster, accuracy within budget"  # GPU speed decides
    content = build_content(record, with_plots=False)
    # The INT8 row is compared with the baseline's CPU timing: no "no ratio" warning, and the
    # headline says which device its speed-up is on.
    assert not [n for n in content.notes if n.startswith("int8 was measured on")]
    assert "2.0x faster than baseline" in content.headline
    assert "speed: both in eager torch on the CPU, from each stage's own timing" in content.headline


def test_cpu_only_run_has_no_gpu_columns() -> None:
    content = build_content(make_record(), with_plots=False)
    headers = content.comparison.headers
    assert not [h for h in headers if "GPU" in h]
    assert [h for h in headers if h.startswith("CPU")] == [
        "CPU latency b1 p50 / p90 ms (speedup)",
        "CPU throughput img/s @ batch (ratio)",
        "CPU process peak RSS MiB",
    ]
    rows = table_rows(render_markdown(content), COMPARED)
    assert rows["prune_quant"]["CPU process peak RSS MiB"] == "310.5"  # no ratio: a process figure


def test_markdown_and_html_tables_agree() -> None:
    content = build_content(gpu_record(), with_plots=False)
    html = render_html(content)
    section = html[html.index(f"<h2>{COMPARED}</h2>"):]
    section = section[: section.index("<h2>", 1)]
    # The page splits the table in two to fit 1280 px, each column under a short header
    # with the full one as its tooltip; kind and runtime go under the stage's name.
    shown = re.findall(r'<th(?: class="num")?(?: title="([^"]*)")?>(.*?)</th>', section)
    full = {title or text for title, text in shown}
    assert set(content.comparison.headers) - full == {"kind", "runtime, precision"}
    assert shown[0] == ("stage", 'stage<br><span class="sub">kind · runtime, precision</span>')
    # the stage in both tables, kind and runtime in neither's headers
    assert len(shown) == len(content.comparison.headers) - 1
    md_rows = table_rows(render_markdown(content), COMPARED)
    assert list(md_rows["baseline"]) == list(content.comparison.headers)
    # A cross-device verdict is grey (unknown), not red (a failed check).
    assert '<span class="base">speed not comparable (other device)</span>' in html


def test_one_latency_plot_per_device(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", gpu_record())
    md, _ = render_report(run_dir)
    names = {p.stem for p in (run_dir / "report_files").glob("*.png")}
    assert "latency_vs_accuracy_cuda" in names
    # one stage timed on the CPU: a lone dot is no plot (the table has its timing)
    assert "latency_vs_accuracy" not in names
    text = md.read_text(encoding="utf-8")
    assert "### Batch-1 GPU latency vs top-1" in text
    assert "int8 was measured on cpu, the reference (baseline) on cuda" in text
