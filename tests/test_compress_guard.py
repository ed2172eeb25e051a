"""The compress search's statistical guard: per-image hits in every accuracy record, the
paired bound on a candidate's drop, the warning for a split too small for the budget, and
the compress report's headline (the test figure first) and title."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from netshrink.bench import evaluate
from netshrink.bench.schema import (
    MAX_HITS_IMAGES,
    Accuracy,
    Environment,
    Latency,
    Measurement,
    pack_hits,
    unpack_hits,
)
from netshrink.cli import main
from netshrink.compress.guard import (
    compress_headline,
    drop_bound,
    images_to_resolve,
    resolution_points,
    split_warning,
)
from netshrink.errors import UserError
from netshrink.recipe import parse_recipe
from netshrink.report.load import load_run
from netshrink.report.markdown import md_escape
from netshrink.stages.record import RunRecord, StageRecord
from netshrink.study import ResultsStore
from netshrink.study.execute import write_study_record
from netshrink.study.report import DB_FILE, STUDY_FILE, render_study_report, study_content
from netshrink.study.schema import Cell

ENV = Environment(cpu="test", cores=2, threads=2, seed=0, python="3", versions={},
                  platform="x")


def _acc(hits: list[bool] | np.ndarray | None, images: int | None = None, split: str = "val",
         top1: float | None = None) -> Accuracy:
    """An accuracy record with these hits (or none: ``images`` and ``top1`` given)."""
    if hits is None:
        assert images is not None and top1 is not None
        return Accuracy(split=split, images=images, top1=top1, top5=1.0)
    hits = np.asarray(hits, dtype=bool)
    return Accuracy(split=split, images=len(hits), top1=hits.sum() / len(hits), top5=1.0,
                    correct=pack_hits(hits))


def _pair(n: int, right: int, losses: int, gains: int) -> tuple[Accuracy, Accuracy]:
    """A reference right on ``right`` of ``n`` images, and a candidate that loses
    ``losses`` of those and gains ``gains`` of the others."""
    ref = np.zeros(n, dtype=bool)
    ref[:right] = True
    cand = ref.copy()
    cand[:losses] = False
    cand[right:right + gains] = True
    return _acc(ref), _acc(cand)


# ------------------------------------------------------------ per-image hits on record


def test_hits_pack_eight_a_byte_in_the_splits_order() -> None:
    hits = np.array([1, 0, 0, 0, 0, 0, 0, 0, 1, 1], dtype=bool)
    text = pack_hits(hits)
    assert text == "AQM="  # bytes 0b00000001, 0b00000011: image i is bit i % 8
    assert unpack_hits(text, 10).tolist() == hits.tolist()
    acc = _acc(hits)
    assert acc.top1 == pytest.approx(0.3) and acc.hits().tolist() == hits.tolist()
    assert "correct" not in repr(acc)  # a long bitmask stays out of reprs


def test_evaluate_records_which_images_top1_got_right() -> None:
    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # class = image value % 3
            return torch.nn.functional.one_hot(x.view(-1).long() % 3, 3).float() + self.w

    class Split:
        labels = torch.tensor([0, 1, 0, 0, 1, 2, 2, 1, 2, 0, 1])

        def __len__(self) -> int:
            return len(self.labels)

        def batches(self, batch_size: int, **_: object):
            for start in range(0, len(self), batch_size):
                idx = torch.arange(start, min(start + batch_size, len(self)))
                yield idx.float().view(-1, 1, 1, 1), self.labels[idx]

    acc = evaluate(Fixed(), Split(), batch_size=4, split_name="val")
    expected = [i % 3 == int(label) for i, label in enumerate(Split.labels)]
    assert acc.hits().tolist() == expected  # across batch boundaries, in order
    assert acc.top1 == pytest.approx(sum(expected) / len(expected))
    # past the bound no hits are kept (the bound lowered for the test)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("netshrink.bench.accuracy.MAX_HITS_IMAGES", 8)
        assert evaluate(Fixed(), Split(), batch_size=4).correct is None


@pytest.mark.parametrize("correct,message", [
    ("AQ", "2 characters of base64 for 10 images; expected 4"),
    ("A" * 10_000, "10,000 characters of base64 for 10 images"),  # refused undecoded
    ("AQ!=", "not base64"),
    ("Af8=", "bits set past the last of the 10 images"),  # bytes 0x01 0xff
    ("BwA=", "3 of 10 images right, but top1 says 2.0"),  # bytes 0x07 0x00
])
def test_a_bad_hits_field_is_refused(correct: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Accuracy(split="val", images=10, top1=0.2, top5=1.0, correct=correct)


def test_hits_are_not_kept_past_the_bound() -> None:
    with pytest.raises(ValueError, match="hits are kept for 1 to 200,000 images"):
        Accuracy(split="val", images=MAX_HITS_IMAGES + 1, top1=0.0, top5=1.0, correct="AA==")


def _measurement(acc: Accuracy, size: int = 1000, p50: float = 1.0) -> Measurement:
    lat = Latency(batch_size=1, runs=10, warmup=1, p50_ms=p50, p90_ms=p50, mean_ms=p50,
                  min_ms=p50, max_ms=p50, std_ms=0.0, images_per_s=1000 / p50)
    return Measurement(input_shape=[1, 8, 8], file="stages/01-x/model.safetensors",
                       size_bytes=size, params=10, nonzero_params=10, latency=lat,
                       accuracy=acc, environment=ENV)


def _run_record(acc: Accuracy) -> RunRecord:
    return RunRecord(name="r", recipe={}, recipe_sha256="x", netshrink_version="0",
                     created="t", updated="t", stages=[
                         StageRecord(index=0, name="baseline", kind="baseline", started="t",
                                     measurement=_measurement(acc))])


def test_run_records_load_with_hits_without_them_and_refuse_bad_ones(tmp_path: Path
                                                                     ) -> None:
    with_hits = _acc([True, False, True])
    (tmp_path / "run.json").write_text(_run_record(with_hits).model_dump_json())
    loaded = load_run(tmp_path).stages[0].measurement.accuracy
    assert loaded is not None and loaded.hits().tolist() == [True, False, True]
    # a record written before hits were recorded has no "correct" key at all
    old = json.loads(_run_record(with_hits).model_dump_json())
    del old["stages"][0]["measurement"]["accuracy"]["correct"]
    (tmp_path / "run.json").write_text(json.dumps(old))
    assert load_run(tmp_path).stages[0].measurement.accuracy.correct is None
    old["stages"][0]["measurement"]["accuracy"]["correct"] = "/w=="  # 0xff: bits past image 3
    (tmp_path / "run.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match=r"run\.json: not a netshrink run record: stages\.0\."
                                        r"measurement\.accuracy: .*correct: bits set past"):
        load_run(tmp_path)


# ------------------------------------------------------------------- the drop's bound


def _tango(b: int, c: int, n: int, d: float) -> float:
    """Tango's score statistic written out (drop_bound's docstring)."""
    big_b = -b - c + (2 * n - b + c) * d
    big_c = -c * d * (1 - d)
    q = (math.sqrt(big_b ** 2 - 8 * n * big_c) - big_b) / (4 * n)
    return (b - c - n * d) / math.sqrt(n * (2 * q + d * (1 - d)))


def test_paired_bound_is_tangos_score_bound_computed_by_hand() -> None:
    ref, cand = _pair(100, right=90, losses=5, gains=2)
    est = drop_bound(ref, cand)
    assert est.paired and (est.losses, est.gains, est.discordant) == (5, 2, 7)
    assert est.drop_points == pytest.approx(3.0)
    assert est.upper_points == pytest.approx(6.8785, abs=1e-3)
    # at the bound the statistic is -z(0.9) = -1.2815516: B = -7 + 197 d, C = -2 d (1 - d)
    assert _tango(5, 2, 100, est.upper_points / 100) == pytest.approx(-1.2815516, abs=1e-6)
    assert est.images == 100 and est.within(6.9) and not est.within(6.8)
    assert drop_bound(ref, cand, confidence=0.95).upper_points > est.upper_points


def test_zero_discordance_still_leaves_a_width_of_about_z_over_n() -> None:
    hits = np.arange(143) % 50 != 0  # 140 of 143 right, both models alike
    est = drop_bound(_acc(hits), _acc(hits))
    assert (est.losses, est.gains, est.drop_points) == (0, 0, 0.0)
    z2 = 1.2815516 ** 2
    assert est.upper_points == pytest.approx(100 * z2 / (143 + z2), rel=1e-6)  # 1.14
    assert not est.within(1.0) and est.within(1.2)
    same = np.ones(5000, dtype=bool)
    assert drop_bound(_acc(same), _acc(same)).upper_points == pytest.approx(0.0328, abs=1e-4)


def test_unpaired_bounds_are_conservative_and_paired_is_tighter() -> None:
    ref, cand = _pair(100, right=90, losses=5, gains=2)
    bare_ref = _acc(None, images=100, top1=0.90)
    bare_cand = _acc(None, images=100, top1=0.87)
    worst = drop_bound(bare_ref, bare_cand)
    # the most disagreement 90% and 87% allow: 23 images, 13 lost and 10 gained
    assert worst.method == "worst-case" and worst.losses is None
    assert worst.upper_points == pytest.approx(9.2737, abs=1e-3)
    assert _tango(13, 10, 100, worst.upper_points / 100) == pytest.approx(-1.2815516, abs=1e-6)
    assert drop_bound(ref, cand).upper_points < worst.upper_points
    assert drop_bound(ref, bare_cand).method == "worst-case"  # hits on one side only
    # every image-by-image outcome with these figures stays below the worst case
    for losses in range(3, 14):
        r, c = _pair(100, right=90, losses=losses, gains=losses - 3)
        assert drop_bound(r, c).upper_points <= worst.upper_points + 1e-9
    # different numbers of images: Agresti-Caffo, two independent samples
    other = drop_bound(bare_ref, _acc(None, images=120, top1=104 / 120))
    assert other.method == "independent"
    assert other.upper_points == pytest.approx(8.7748, abs=1e-3)
    assert other.drop_points == pytest.approx(100 * (0.9 - 104 / 120))


def test_a_candidate_that_only_loses_is_bounded_about_as_often_as_promised() -> None:
    # The harmful case a Wald-type bound misses: 1% of 143 images lost, none gained.
    rng = np.random.default_rng(0)
    draws = rng.multinomial(143, [0.01, 0.0, 0.99], size=4000)
    uppers = {}
    for b in set(draws[:, 0].tolist()):
        ref, cand = _pair(143, right=140, losses=b, gains=0)
        uppers[b] = drop_bound(ref, cand).upper_points
    covered = np.mean([uppers[b] >= 1.0 for b in draws[:, 0]])
    assert covered >= 0.9


def test_a_bound_never_falls_below_the_drop_and_bad_inputs_are_refused() -> None:
    ref, cand = _pair(10, right=10, losses=10, gains=0)  # lost everything
    assert drop_bound(ref, cand).upper_points >= 100.0
    better = drop_bound(*_pair(200, right=150, losses=0, gains=30))
    assert better.drop_points == pytest.approx(-15.0) and better.upper_points < 0
    with pytest.raises(UserError, match="'val' split with top-1 on the 'test' split"):
        drop_bound(ref, _acc([True] * 10, split="test"))
    for bad in (0.5, 1.0, 1.5, True):
        with pytest.raises(UserError, match="confidence"):
            drop_bound(ref, cand, confidence=bad)


# ---------------------------------------------------------------- the split's warning


def test_a_split_too_small_for_the_budget_is_warned_in_plain_words() -> None:
    text = split_warning(143, 1.0, 0.9)
    assert text is not None
    assert "143 images" in text and "one image is 0.70 points" in text
    assert "uncertain by up to 2.40 points at 90% confidence" in text
    assert "only when the upper 90% bound of its drop is" in text  # what the guard does
    assert "--val-size 693" in text and "--budget-points 2.5" in text  # what to do
    assert "on 5,000 images: 0.02 and 0.36 points" in text
    assert split_warning(5000, 1.0, 0.9) is None
    assert split_warning(5000, 0.3, 0.9) is not None  # 0.36 points > 0.3
    assert split_warning(143, 2.5, 0.9) is None  # the budget the warning offers
    assert "shown more accurate" in (split_warning(5000, 0.0, 0.9) or "")
    assert resolution_points(143) == pytest.approx(2.4041, abs=1e-3)
    assert resolution_points(images_to_resolve(1.0) or 0) <= 1.0
    assert resolution_points((images_to_resolve(1.0) or 0) - 1) > 1.0


# ------------------------------------------------------------------------ the headline


def test_the_headline_leads_with_the_test_figure() -> None:
    ref_test, cand_test = _pair(360, right=350, losses=6, gains=4)
    ref_val, cand_val = _pair(143, right=140, losses=1, gains=1)
    line = compress_headline(chosen="ch0.2-b4", budget_points=1.0, ref_test=ref_test,
                             chosen_test=cand_test, ref_val=ref_val, chosen_val=cand_val,
                             ref_size_bytes=800_000, chosen_size_bytes=100_000,
                             ref_p50_ms=2.0, chosen_p50_ms=1.0, runtime="openvino")
    assert line.startswith("Test: ch0.2-b4 96.67% top-1 against the input model's 97.22%, "
                           "-0.56 points, within the 1-point budget on test by its point "
                           "estimate only")
    assert line.index("Test:") < line.index("validation: 97.90% against 97.90%, +0.00")
    assert "360 test images" in line and "143 images" in line
    assert "8.00x smaller (100,000 B) and 2.00x the batch-1 speed in openvino" in line
    assert "\n" not in line
    within = compress_headline(chosen="c", budget_points=3.0, ref_test=ref_test,
                               chosen_test=cand_test)
    assert "within the 3-point budget on test (the drop at most" in within
    over = compress_headline(chosen="c", budget_points=0.25, ref_test=ref_test,
                             chosen_test=cand_test)
    assert "NOT within the 0.25-point budget on test" in over
    dense = compress_headline(chosen="c", budget_points=1.0, ref_p50_ms=3.0, chosen_p50_ms=1.0,
                              runtime="openvino", against="the dense INT8 IR")
    assert dense.endswith("3.00x the batch-1 speed in openvino (p50 1.000 ms) against the "
                          "dense INT8 IR.")
    missing = compress_headline(chosen="c", budget_points=1.0)
    assert missing.startswith("Chosen c; not measured on the test split")
    none = compress_headline(chosen=None, budget_points=1.0, ref_test=ref_test,
                             why_none="no candidate's upper bound stayed within it on the "
                                      "validation split")
    assert none.startswith("Nothing chosen: no candidate's upper bound")
    assert "97.22% top-1 on test" in none


# -------------------------------------------------------------- the compress report

FOLDER = "compress"  # the folder: its report said "netshrink study: compress-compress"


def _compress_folder(tmp_path: Path, headline: str | None) -> Path:
    """A compress folder as the search leaves it: three candidates sharing the input
    model's baseline, each with a fine-tuned and a deployed stage."""
    out = tmp_path / FOLDER
    out.mkdir()
    name = f"compress-{FOLDER}"
    base = np.arange(143) % 20 != 0
    cells = []
    with ResultsStore(out / DB_FILE) as store:
        store.claim(name, out)
        for k, ratio in enumerate((0.0, 0.2, 0.35)):
            cand = f"ch{ratio:g}-b4"
            recipe = parse_recipe({
                "name": f"{name}.{cand}", "model": {"arch": "resnet_tiny"},
                "data": {"name": "digits"},
                "stages": [{"kind": "prune.magnitude", "name": "sparse", "ratio": 0.5},
                           {"kind": "quant.kmeans", "name": "deploy", "bits": 4}]})
            cell = Cell(name=cand, axes={"channels": f"{ratio:g}"}, recipe=recipe)
            cells.append(cell)
            hits = base.copy()
            hits[:2 * k] = False
            stages = [StageRecord(index=i, name=stage, kind=kind, key=key, started="t",
                                  measurement=_measurement(acc, size, p50))
                      for i, (stage, kind, key, acc, size, p50) in enumerate([
                          ("baseline", "baseline", "base", _acc(base), 800_000, 2.0),
                          ("sparse", "prune.magnitude", f"{cand}1", _acc(hits), 800_000,
                           2.0),
                          ("deploy", "quant.kmeans", f"{cand}2", _acc(hits),
                           100_000 - 10_000 * k, 1.5)])]
            store.record_cell(name, cand, cell.axes, cell.recipe_sha256,
                              str(out / "cells" / cand), stages, 1.0)
    write_study_record(out, name, cells, out / DB_FILE,
                       spec={"compress": {"budget_points": 1.0}, "recipe": {}},
                       report={"accuracy_budget": 1.0, "baseline": "baseline"},
                       chosen="ch0.2-b4", notes=["Decided on 143 validation images."],
                       headline=headline)
    return out


def test_a_compress_report_is_titled_so_and_its_headline_comes_first(tmp_path: Path,
                                                                      capsys) -> None:
    headline = compress_headline(chosen="ch0.2-b4", budget_points=1.0,
                                 ref_test=_pair(360, 350, 6, 4)[0],
                                 chosen_test=_pair(360, 350, 6, 4)[1])
    out = _compress_folder(tmp_path, headline)
    content = study_content(out, with_plots=False)
    assert content.title == f"netshrink compress: {FOLDER}"
    assert content.lead == headline
    # candidates counted, not stage rows (1 baseline + 3 x 2 stages = 7 rows)
    assert "of 3 candidates" in content.headline and "models" not in content.headline
    assert "top-1 on val)" in content.headline
    assert content.notes[0] == "Decided on 143 validation images."
    assert content.notes[1].startswith("Compress search of 3 candidates; 3 recorded")
    md_path, html_path = render_study_report(out)
    lines = md_path.read_text().splitlines()
    assert lines[0] == f"# netshrink compress: {FOLDER}"
    assert lines[2] == f"**{md_escape(headline)}**"  # above the meta lines and the rest
    html = html_path.read_text()
    assert html.index('class="headline lead"') < html.index('class="meta"')
    assert main(["study", "show", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == headline


def test_an_older_compress_record_without_a_headline_still_renders(tmp_path: Path) -> None:
    out = _compress_folder(tmp_path, None)
    record = json.loads((out / STUDY_FILE).read_text())
    del record["headline"]
    (out / STUDY_FILE).write_text(json.dumps(record))
    content = study_content(out, with_plots=False)
    assert content.lead is None and content.title == f"netshrink compress: {FOLDER}"
    assert not render_study_report(out)[0].read_text().splitlines()[2].startswith("**")


def test_old_store_rows_without_hits_read_and_a_bad_one_is_named(tmp_path: Path) -> None:
    out = _compress_folder(tmp_path, None)
    db = sqlite3.connect(out / DB_FILE)
    rows = db.execute("SELECT cell, stage, record FROM rows").fetchall()
    for cell, stage, text in rows:  # as written before hits were recorded
        record = json.loads(text)
        del record["measurement"]["accuracy"]["correct"]
        db.execute("UPDATE rows SET record = ? WHERE cell = ? AND stage = ?",
                   (json.dumps(record), cell, stage))
    db.commit()
    assert "of 3 candidates" in study_content(out, with_plots=False).headline
    cell, stage, text = rows[-1]
    record = json.loads(text)
    record["measurement"]["accuracy"]["correct"] = "AAAA"
    db.execute("UPDATE rows SET record = ? WHERE cell = ? AND stage = ?",
               (json.dumps(record), cell, stage))
    db.commit()
    db.close()
    with pytest.raises(UserError, match=rf"the row of '{cell}'/'{stage}' holds no stage "
                                        r"record netshrink wrote \(measurement\.accuracy: "
                                        r"Value error, correct: 4 characters of base64"):
        study_content(out, with_plots=False)
