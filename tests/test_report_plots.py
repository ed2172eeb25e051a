"""The report's plots: a cost axis in log scale where its range calls for it, a marker per
runtime, no curve of one point (a table instead), the fraction pruned against each
stage's own input (in a study too), and weight histograms within one architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.figure import Figure

import netshrink.report.plots as report_plots
from netshrink.report import build_content, render_markdown
from netshrink.report.lineage import stage_inputs
from netshrink.report.prune_plots import accuracy_vs_pruned
from netshrink.report.stage_files import RunFiles, WeightPair, load_run_files
from netshrink.stages.record import RunRecord
from netshrink.study import ResultsStore
from netshrink.study.report import DB_FILE, combined_record, read_study_record
from report_folders import make_study_folder
from report_records import _history, make_pruning_run, make_record


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures the run-record plots draw, in order (not saved as PNG)."""
    kept: list[Figure] = []

    def keep(fig: Figure, **_: int) -> bytes:
        kept.append(fig)
        return b""

    monkeypatch.setattr(report_plots, "figure_png", keep)
    return kept


@pytest.mark.parametrize(("slowest_ms", "scale"), [(99.0, "linear"), (101.0, "log")])
def test_latency_axis_is_log_when_its_range_passes_ten_times(
        figures: list[Figure], slowest_ms: float, scale: str) -> None:
    record = make_record()  # 20 ms, 10 ms and 19.5 ms at batch 1
    last = record.stages[2]
    # the range is slowest / 10 ms: 9.9x stays linear, 10.1x is drawn in log scale
    last.measurement = last.measurement.model_copy(update={"latency": last.measurement.latency
                                                           .model_copy(update={
                                                               "p50_ms": slowest_ms,
                                                               "p90_ms": slowest_ms * 1.08})})
    (plot,) = report_plots.latency_vs_accuracy(record.stages, reference=0)
    ax = figures[-1].axes[0]
    assert ax.get_xscale() == scale
    assert ("log-scale x axis" in plot.alt) == (scale == "log")
    assert ax.get_xlabel() == ("batch-1 p50 latency on CPU, eager torch (ms)"
                               + (" (log scale)" if scale == "log" else ""))


def test_several_runtimes_get_a_marker_each_and_say_so(figures: list[Figure]) -> None:
    record = make_record()
    int8 = record.stages[1]
    int8.measurement = int8.measurement.model_copy(update={"runtime": "onnxruntime"})
    (plot,) = report_plots.latency_vs_accuracy(record.stages, reference=0)
    ax = figures[-1].axes[0]
    assert ax.get_title() == "Batch-1 CPU latency vs top-1, across runtimes"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"eager torch", "ONNX Runtime"} <= set(legend)
    assert "across runtimes: eager torch, ONNX Runtime" in plot.alt


def test_one_epoch_training_is_a_table_not_a_curve(figures: list[Figure]) -> None:
    record = make_record()
    record.stages[1].history = _history(1, 0.9)
    record.stages[2].history = _history(1, 0.5)
    content = build_content(record)
    assert "training" not in [p.name for p in content.plots]
    text = render_markdown(content)
    assert "### Training history: prune_quant" in text  # the table shows the epoch
    # a stage of two epochs has its curve, the one-epoch stage its table only
    record.stages[2].history = _history(2, 0.5)
    curves = report_plots.training_curves(record.stages)
    assert curves is not None
    assert curves.alt == ("Train loss and top-1 per epoch for finetune; trained one epoch, "
                          "so no curve (see the history tables): prune_quant")
    loss_ax = figures[-1].axes[0]
    assert [len(line.get_xdata()) for line in loss_ax.get_lines()] == [2]


def test_a_scatter_of_one_point_is_not_drawn() -> None:
    record = make_record()
    for s in record.stages[1:]:
        s.measurement = s.measurement.model_copy(update={"latency": None})
    assert report_plots.latency_vs_accuracy(record.stages, reference=0) == []


# ---------------------------------------------------------------- fraction pruned


def test_fraction_pruned_in_a_study_is_against_each_cells_input(tmp_path: Path) -> None:
    """A study lists every cell's stages in one record, in no order one could chain
    them by: each names its start, and a pruning stage is measured against it."""
    out = make_study_folder(tmp_path / "study")
    study = read_study_record(out)
    with ResultsStore(out / DB_FILE, readonly=True) as store:
        record = combined_record(study, store.rows(study["name"]))
    stages = list(record.stages)
    plot = accuracy_vs_pruned(stages, RunFiles(), 1.0, reference=1,
                              inputs=stage_inputs(record, stages))
    assert plot is not None
    # 0.3 of the channels off every layer leaves 0.7 * 0.7 of the trained model's params
    assert "0.3/prune 51.0% removed from train" in plot.alt
    assert "0.7/prune 91.0% removed from train" in plot.alt


def test_stage_inputs_follow_from_and_chaining() -> None:
    record = make_record()
    record.recipe["stages"] = [{"kind": "distill.kd", "name": "kd"},
                               {"kind": "export.onnx", "name": "onnx"},
                               {"kind": "prune.channel", "name": "prune"},
                               {"kind": "prune.magnitude", "name": "sparse", "from": "kd"}]
    # an export chains nothing: the pruning after it starts from the distilled model
    assert stage_inputs(record) == {"kd": "baseline", "onnx": "kd", "prune": "kd",
                                    "sparse": "kd"}


# ---------------------------------------------------------------- weight histograms


def _other_architecture(path: Path) -> None:
    """Rewrite the model file at ``path`` as another network: other layer names."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file({k.replace("layer1.", "layer2."): t for k, t in tensors.items()}, str(path))


def _weights(run_dir: Path, record: RunRecord) -> tuple[WeightPair | None, str]:
    """The weight pair the report would plot, and its notes."""
    files = load_run_files(run_dir, record)
    return files.weights, " ".join(files.notes)


def test_weight_histogram_is_skipped_across_architectures(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    record = make_pruning_run(run_dir)
    _other_architecture(run_dir / "stages/04-magnitude/model.safetensors")
    pair, notes = _weights(run_dir, record)
    assert pair is None
    assert ("Weight histogram skipped: no model before magnitude has its architecture (the "
            "reference baseline has other parameters)") in notes


def test_weight_histogram_takes_the_first_model_of_the_last_ones_architecture(
        tmp_path: Path) -> None:
    """A teacher of another architecture: the histogram compares the student's weights
    before and after, with a note why not the teacher's."""
    run_dir = tmp_path / "run"
    record = make_pruning_run(run_dir)
    for stage in ("02-search", "03-channels", "04-magnitude"):
        _other_architecture(run_dir / f"stages/{stage}/model.safetensors")
    pair, notes = _weights(run_dir, record)
    assert pair is not None and (pair.before_stage, pair.after_stage) == ("search", "magnitude")
    assert ("The weight histogram compares search with magnitude: the reference baseline "
            "has another architecture") in notes
