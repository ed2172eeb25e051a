"""Planted links and outputs that would replace what is not netshrink's (issue 23, part 1).

One table, as in ``test_hostile_runs``: each case plants its trap in the test's folder
(a symbolic link where a run, report, cache or compress search writes; a file of the
user's where an export writes beside its output) and names the command. Every case must
end with exit 2, one ``netshrink: error:`` line, and no byte changed anywhere under the
test's folder: the victim's files, the run folder, everything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from netshrink.errors import UserError
from test_hostile_runs import (
    Env,
    refuse_case,
    snapshot,
)


def _victim(env: Env, name: str = "victim") -> Path:
    """A folder of the user's, with a file that must survive."""
    folder = env.tmp / name
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


def _link(link: Path, target: Path) -> None:
    if link.is_dir() and not link.is_symlink():
        import shutil

        shutil.rmtree(link)
    elif link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target, target_is_directory=target.is_dir())


def _resume(env: Env) -> list[str]:
    return ["run", env.recipe(env.tiny(max_steps=3)), "--out", str(env.out)]


# ---------------------------------------------------------------- the run folder


def _stages_linked_with_listed_folder(env: Env) -> list[str]:
    # The case of the review: ``stages/`` links to the user's folder, and run.json lists
    # a folder name that exists there; the resumed run removed it (rmtree) before.
    victim = _victim(env)
    (victim / "05-mine").mkdir()
    (victim / "05-mine" / "data.csv").write_text("1,2\n")

    def edit(record: dict) -> None:
        record["stages"], record["folders"] = [], ["05-mine"]
    out = env.tamper(edit)
    _link(out / "stages", victim)
    return _resume(env)


def _stages_linked(env: Env) -> list[str]:
    out = env.run_copy()
    victim = _victim(env)
    for child in (out / "stages").iterdir():
        os.rename(child, victim / child.name)
    _link(out / "stages", victim)
    return _resume(env)


def _stage_folder_linked(env: Env) -> list[str]:
    out = env.run_copy()
    victim = _victim(env)
    os.rename(out / "stages" / "01-train", victim / "01-train")
    _link(out / "stages" / "01-train", victim / "01-train")
    return _resume(env)


def _report_files_linked(env: Env) -> Path:
    """A run whose ``report_files`` links to the user's folder of plots."""
    out = env.run_copy()
    victim = _victim(env)
    for name in ("top1.png", "training.png"):
        (victim / name).write_bytes(b"the user's own plot")
    _link(out / "report_files", victim)
    return out


def _report_files_linked_resume(env: Env) -> list[str]:
    _report_files_linked(env)
    return _resume(env)


def _report_files_linked_report(env: Env) -> list[str]:
    return ["report", str(_report_files_linked(env))]


def _report_md_linked(env: Env) -> list[str]:
    out = env.run_copy()
    victim = _victim(env)
    _link(out / "report.md", victim / "thesis.tex")
    return ["report", str(out)]


def _run_json_linked(env: Env) -> list[str]:
    out = env.run_copy()
    victim = _victim(env)
    os.rename(out / "run.json", victim / "run.json")
    _link(out / "run.json", victim / "run.json")
    return _resume(env)


def _plot_inside_report_files_linked(env: Env) -> list[str]:
    out = env.run_copy()
    victim = _victim(env)
    (out / "report_files").mkdir(exist_ok=True)
    _link(out / "report_files" / "top1.png", victim / "thesis.tex")
    return ["report", str(out)]


# ---------------------------------------------------------------- the model cache


def _cache_root(env: Env) -> Path:
    return Path(os.environ["NETSHRINK_CACHE"])


def _planted_bucket(env: Env) -> Path:
    """A cache whose ``ab/`` bucket links to the user's folder, holding what looks like
    an entry and a stale temporary folder of the cache's naming."""
    victim = _victim(env)
    entry = victim / ("ab" + "0" * 62)
    entry.mkdir()
    (entry / "model.safetensors").write_bytes(b"x")
    (entry / "stage.json").write_text(json.dumps({"sha256": "0" * 64}))
    stale = victim / ".ab0000000000-x"
    stale.mkdir()
    os.utime(stale, (0, 0))
    root = _cache_root(env)
    root.mkdir(parents=True)
    _link(root / "ab", victim)
    return root


def _cache_bucket_linked_run(env: Env) -> list[str]:
    _planted_bucket(env)
    return ["run", env.recipe(env.tiny()), "--out", str(env.out)]


def _cache_bucket_linked_prune(env: Env) -> list[str]:
    _planted_bucket(env)
    return ["cache", "prune", "--max-size", "0"]


def _cache_measurements_linked(env: Env) -> list[str]:
    victim = _victim(env)
    root = _cache_root(env)
    root.mkdir(parents=True)
    _link(root / "measurements", victim)
    return ["cache", "clear"]


# ---------------------------------------------------------------- compress folders


def _compress_folder(env: Env) -> Path:
    """A compress folder (its ``study.json`` mark) for a resumed search."""
    env.out.mkdir()
    (env.out / "study.json").write_text(json.dumps({"name": "compress-out", "cells": []}))
    return env.out


def _compress_argv(env: Env) -> list[str]:
    return ["compress", "--weights", env.model_file(), "--data-dir", str(env.fashion),
            "--out", str(env.out)]


def _compress_cells_linked(env: Env) -> list[str]:
    out = _compress_folder(env)
    _link(out / "cells", _victim(env))
    return _compress_argv(env)


def _compress_report_files_linked(env: Env) -> list[str]:
    out = _compress_folder(env)
    _link(out / "report_files", _victim(env))
    return _compress_argv(env)


def _compress_db_linked(env: Env) -> list[str]:
    out = _compress_folder(env)
    victim = _victim(env)
    _link(out / "results.sqlite", victim / "thesis.tex")
    return _compress_argv(env)


# ---------------------------------------------------------------- export outputs


def _export(env: Env, fmt: str, out: Path, weights: str | None = None) -> list[str]:
    return ["export", "--weights", weights or env.model_file(), "--format", fmt,
            "--out", str(out)]


def _ir_bin_unrelated(env: Env) -> list[str]:
    (env.tmp / "model.bin").write_bytes(b"the user's firmware image")
    return _export(env, "openvino", env.tmp / "model.xml")


def _ir_over_users_xml(env: Env) -> list[str]:
    (env.tmp / "model.xml").write_text("<settings>mine</settings>")
    (env.tmp / "model.bin").write_bytes(b"the user's firmware image")
    return _export(env, "openvino", env.tmp / "model.xml")


def _export_onto_input(env: Env) -> list[str]:
    weights = env.model_file("m.onnx")  # a safetensors file under an .onnx name
    return _export(env, "onnx", Path(weights), weights)


def _export_onto_hard_link_of_input(env: Env) -> list[str]:
    weights = env.model_file()
    os.link(weights, env.tmp / "same.onnx")
    return _export(env, "onnx", env.tmp / "same.onnx", weights)


def _export_over_users_file(env: Env) -> list[str]:
    (env.tmp / "notes.onnx").write_text("not a model: the user's notes")
    return _export(env, "onnx", env.tmp / "notes.onnx")


def _export_over_users_model(env: Env) -> list[str]:
    mine = env.model_file("mine.safetensors")
    return _export(env, "onnx", Path(mine), env.model_file("other.safetensors"))


def _trt_folder_with(name: str, text: str) -> Callable[[Env], list[str]]:
    """A tensorrt-onnx export into a folder of the user's holding ``name``."""
    def build(env: Env) -> list[str]:
        folder = env.tmp / "trt"
        folder.mkdir()
        (folder / name).write_text(text)
        return ["export", "--weights", env.model_file(), "--format", "tensorrt-onnx",
                "--forms", "fp32", "--out", str(folder)]
    return build


def _bench_json_over(target: Callable[[Env], Path]) -> Callable[[Env], list[str]]:
    """``bench --json`` naming a file that is not an earlier --json output."""
    def build(env: Env) -> list[str]:
        weights = env.model_file()
        return ["bench", "--weights", weights, "--repeats", "1",
                "--json", str(target(env))]
    return build


def _users_notes(env: Env) -> Path:
    (env.tmp / "notes.json").write_text("my notes, not JSON")
    return env.tmp / "notes.json"


CASES: dict[str, Callable[[Env], list[str]]] = {
    "bench-json-over-a-users-file": _bench_json_over(_users_notes),
    "bench-json-over-the-model": _bench_json_over(lambda env: env.tmp / "m.safetensors"),
    "resume-stages-linked-with-a-listed-folder": _stages_linked_with_listed_folder,
    "resume-stages-linked": _stages_linked,
    "resume-stage-folder-linked": _stage_folder_linked,
    "resume-report-files-linked": _report_files_linked_resume,
    "resume-run-json-linked": _run_json_linked,
    "report-report-files-linked": _report_files_linked_report,
    "report-md-linked": _report_md_linked,
    "report-plot-file-linked": _plot_inside_report_files_linked,
    "run-cache-bucket-linked": _cache_bucket_linked_run,
    "cache-prune-bucket-linked": _cache_bucket_linked_prune,
    "cache-clear-measurements-linked": _cache_measurements_linked,
    "compress-cells-linked": _compress_cells_linked,
    "compress-report-files-linked": _compress_report_files_linked,
    "compress-results-db-linked": _compress_db_linked,
    "export-ir-bin-of-someone-else": _ir_bin_unrelated,
    "export-ir-over-a-users-xml": _ir_over_users_xml,
    "export-out-is-the-input": _export_onto_input,
    "export-out-is-a-hard-link-of-the-input": _export_onto_hard_link_of_input,
    "export-over-a-users-file": _export_over_users_file,
    "export-over-a-users-model": _export_over_users_model,
    "export-trt-folder-users-script": _trt_folder_with(
        "trtexec.sh", "#!/bin/sh\necho my own deployment script\n"),
    "export-trt-folder-users-file-of-a-form-name": _trt_folder_with(
        "model.fp32.onnx", "the user's notes"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_planted_links_and_foreign_outputs_are_refused(
    case: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, fashion_dir: Path,
    trained_run: Path,
) -> None:
    refuse_case(CASES[case], capsys, tmp_path, fashion_dir, trained_run)


# ---------------------------------------------------------------- the same through the API


def _tiny_module() -> torch.nn.Module:
    from netshrink.models import ModelSpec, build_model

    return build_model(ModelSpec(arch="resnet_tiny", num_classes=10, in_channels=1))


def test_api_compress_refuses_a_users_folder_before_writing_the_input(tmp_path: Path) -> None:
    import netshrink

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="not empty"):
        netshrink.compress(_tiny_module(), folder, data="fashion_mnist", quiet=True)
    assert snapshot(tmp_path) == before  # no input/model.safetensors written first


def test_api_compress_refuses_bad_settings_before_writing_the_input(tmp_path: Path) -> None:
    import netshrink

    before = snapshot(tmp_path)
    with pytest.raises(UserError):
        netshrink.compress(_tiny_module(), tmp_path / "new", quiet=True)  # no dataset known
    assert snapshot(tmp_path) == before


def test_api_save_refuses_the_results_own_file_and_a_users_file(tmp_path: Path) -> None:
    import netshrink

    x = torch.zeros(1, 1, 28, 28)
    exported = netshrink.export(_tiny_module(), tmp_path / "m.onnx", example_input=x)
    (tmp_path / "notes.onnx").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="is the input"):
        exported.save(tmp_path / "m.onnx")
    with pytest.raises(UserError, match="the file exists and is not"):
        exported.save(tmp_path / "notes.onnx")
    with pytest.raises(UserError, match="the file exists and is not"):
        netshrink.export(_tiny_module(), tmp_path / "notes.onnx", example_input=x)
    assert snapshot(tmp_path) == before
    # a new name is fine, and so is replacing an earlier file of the same kind
    copy = exported.save(tmp_path / "copy.onnx")
    assert copy.read_bytes() == (tmp_path / "m.onnx").read_bytes()
    assert exported.save(copy) == copy


def test_the_table_covers_the_classes() -> None:
    names = " ".join(CASES)
    for word in ("resume", "report", "cache", "compress", "export"):
        assert word in names
    assert len(CASES) >= 20


def test_api_quantize_checks_everything_before_a_file_and_leaves_no_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tempfile

    import netshrink

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "model.onnx").write_text("the user's notes")
    x = torch.zeros(2, 1, 28, 28)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="calibrates"):  # found before the float export
        netshrink.quantize(_tiny_module(), example_input=x)
    with pytest.raises(UserError, match="QAT trains"):
        netshrink.quantize(_tiny_module(), netshrink.QATConfig(), example_input=x, out=mine)
    with pytest.raises(UserError, match=r"model\.onnx: the file exists and is not"):
        netshrink.quantize(_tiny_module(), netshrink.DynamicConfig(), example_input=x,
                           out=mine)
    assert snapshot(tmp_path) == before  # no netshrink-* folder left in the temp folder
    # a failure past the checks (here: an exporter that cannot trace) removes its folder
    monkeypatch.setattr("netshrink.stages.quant.export_onnx", _fails)
    with pytest.raises(UserError, match="cannot export"):
        netshrink.quantize(_tiny_module(), netshrink.DynamicConfig(), example_input=x)
    assert snapshot(tmp_path) == before


def _fails(*args: object, **kwargs: object) -> None:
    raise UserError("cannot export the model to ONNX: (a test)")
