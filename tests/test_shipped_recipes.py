"""Every shipped recipe (recipes/*.yaml) runs, shrunk: the same stages with the same
options on a tiny subset of the data, one optimizer step per training, through the real
runner (report included), reading the files it names: a model that another shipped recipe
writes is made by running that recipe, shrunk, first, into the folder its header command
names; a dataset that is not installed (CIFAR-10) is written in its real format where the
recipe expects it.

``shrink`` knows every option of every stage: what it keeps (options that cost no time, or
that decide what is computed) and what it makes small (epochs, steps, images, batches). An
option, stage kind or dataset it does not know fails the test, naming it, so that a new one
is classified here instead of being run at full size.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fixtures_data import write_cifar10_python
from netshrink.bench._common import input_dtype
from netshrink.recipe import parse_recipe, run_recipe
from netshrink.runtime import ModelStats, open_runtime
from netshrink.runtime.base import Executable
from netshrink.stages.record import RunRecord

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

TRAIN_LIMIT, TEST_LIMIT = 64, 32  # training / test images kept
SMALL = 16  # images of every small subset (val, calibration, scans) and batch sizes
# Side of the images where a CIFAR stem is in the recipe: a CIFAR-stem ResNet-50 costs
# 1.3 G MACs an image at 32x32, 16x less at 8x8. (ImageNet stems keep the data's size.)
CIFAR_STEM_IMAGE_SIZE = 8

# Stages that cannot run on a CPU, left out of a recipe's shrunk form (and only these).
CUDA_ONLY: dict[str, dict[str, str]] = {
    "quickstart_gpu.yaml": {
        "fp16-cudagraphs": "deploy.torch precision fp16 computes in fp16 only on CUDA, and "
                           "compile: reduce-overhead is CUDA graphs",
    },
}

# Shrunk, these still take longer than the default run can afford (seconds measured on 2
# busy CPU cores; the stages' fixed costs, ONNX export and quantization, model files,
# dominate): `python -m pytest -m slow tests/test_shipped_recipes.py` runs them.
SLOW = {
    "study_r18_r50_compression_r50.yaml": "~100 s: 34 stages on a ResNet-50",
    "study_r18_r50_compression_r18.yaml": "~20 s: 12 stages, a ResNet-50 teacher",
    "study_kd_prune_ptq.yaml": "~15 s",
    "study_r18_quant_prune.yaml": "~15 s",
    "study_finegrained_vs_channel.yaml": "~11 s",
    "fashion_quant.yaml": "~35-45 s: automatic mixed precision quantizes layer by layer",
}


class ShrinkError(Exception):
    """The shrinker met something it does not know how to make small."""


KEEP = "keep"


def _at_most(limit: float) -> Callable[[Any], Any]:
    def rule(value: Any) -> Any:
        return min(value, limit) if isinstance(value, int | float) else value
    return rule


def _cpu_precision(value: str) -> str:
    if value in ("fp16", "tf32"):
        raise ShrinkError(f"precision {value!r} needs CUDA: list the stage in CUDA_ONLY")
    return value


class _FirstOf:
    """A rule applied whether or not the recipe gives the option: its first value, or
    the first of the option's default."""

    def __init__(self, default: list[Any]) -> None:
        self.default = default

    def __call__(self, values: list[Any]) -> list[Any]:
        return values[:1]


def _first_of(key: str) -> _FirstOf:
    from netshrink.compress.options import CompressConfig

    return _FirstOf(getattr(CompressConfig(), key)[:1])


def _cpu_compile(value: str) -> str:
    if value != "off":
        raise ShrinkError(f"compile {value!r} would compile for minutes on a CPU: list the "
                          "stage in CUDA_ONLY or give it a rule")
    return value


def _no_tensorrt(value: str) -> str:
    if value == "tensorrt":
        raise ShrinkError("runtime 'tensorrt' needs CUDA and TensorRT: list the stage in "
                          "CUDA_ONLY")
    return value


_TRAINING: dict[str, Any] = {
    "epochs": 1, "max_steps": 1, "batch_size": SMALL,
    **dict.fromkeys(["optimizer", "lr", "momentum", "nesterov", "weight_decay",
                     "warmup_epochs", "schedule", "label_smoothing", "amp", "channels_last",
                     "grad_clip", "eval_every", "checkpoint_minutes", "keep_zeros", "seed"],
                    KEEP),
}

# Per stage kind, each option's rule. KEEP: runs as written. A value: replaces the
# recipe's, and is set where the recipe leaves the option out (a large default is made
# small too). A function: maps the recipe's value, where it gives one.
STAGE_RULES: dict[str, dict[str, Any]] = {
    "train": _TRAINING,
    # distill: {teacher_stage, alpha, temperature}; a teacher file is found by needed_files.
    "finetune": {**_TRAINING, "distill": KEEP},
    "distill.kd": {**_TRAINING, **dict.fromkeys(["teacher", "teacher_stage", "alpha",
                                                 "temperature", "student", "student_stage"],
                                                KEEP)},
    "quant.qat": {**_TRAINING, "epochs": _at_most(1), "per_channel": KEEP,
                  "freeze_observers_after": KEEP, "distill": KEEP},
    "prune.magnitude": {
        **dict.fromkeys(["ratio", "scope", "include", "exclude", "schedule", "finetune_lr"],
                        KEEP),
        # between steps: FinetuneConfig(epochs=finetune_epochs), one step of the tiny split
        "steps": _at_most(3), "finetune_epochs": _at_most(1)},
    "prune.channel": {
        **dict.fromkeys(["ratio", "importance", "scope", "ignore", "include", "exclude",
                         "round_to", "max_layer_ratio", "finetune_lr"], KEEP),
        "steps": _at_most(3), "finetune_epochs": _at_most(1)},
    "prune.nm": dict.fromkeys(["n", "m", "include", "exclude"], KEEP),
    "prune.sensitivity": {
        **dict.fromkeys(["method", "ratio", "include", "exclude", "split"], KEEP),
        "max_images": SMALL, "batch_size": SMALL},
    "prune.search": {
        **dict.fromkeys(["method", "scope", "tolerance_points", "include", "exclude", "lo",
                         "hi", "split", "finetune_lr"], KEEP),
        "iterations": 2, "max_images": SMALL, "finetune_steps": _at_most(1),
        "finetune_batch_size": SMALL, "batch_size": SMALL},
    "quant.ptq": {
        **dict.fromkeys(["runtime", "bits", "per_channel", "calibration", "percentile",
                         "activations", "reduce_range", "keep_float", "include", "exclude",
                         "accuracy_budget"],
                        KEEP),
        "calibration_images": _at_most(SMALL), "budget_images": SMALL},
    "quant.dynamic": dict.fromkeys(["per_channel", "bits"], KEEP),
    "quant.fp16": {"runtime": KEEP},
    "quant.bf16": {"runtime": KEEP},
    "quant.kmeans": {
        **dict.fromkeys(["bits", "include", "exclude", "finetune_lr"], KEEP),
        "finetune_epochs": _at_most(1), "max_iter": 5},
    "export.onnx": dict.fromkeys(["runtime", "opset"], KEEP),
    "export.tensorrt": {
        **dict.fromkeys(["forms", "measure", "opt_batch", "max_batch", "opset"], KEEP),
        "calibration_images": _at_most(SMALL), "runtime": _no_tensorrt},
    "compress": {
        **dict.fromkeys(["budget_points", "reserve_points", "target", "runtime", "deploy",
                         "channel_scope", "finetune_lr", "alpha", "temperature", "threads",
                         "measure_batch", "amp", "search", "eta", "confidence",
                         "max_latency_ms", "max_size_mb", "max_macs", "speedup"], KEEP),
        "rungs": _first_of("rungs"), "time_budget_s": KEEP, "workers": 1,
        # each walk's first step only: every kind of candidate, a few of them (a list
        # the recipe leaves out is CompressConfig's default, cut the same way)
        **{key: _first_of(key) for key in ("channel_ratios", "sparsities", "kmeans_bits",
                                           "drop_blocks")},
        "finetune_epochs": 1, "max_steps": 1, "kmeans_finetune_epochs": _at_most(0.1),
        "batch_size": SMALL, "val_size": SMALL, "calib_size": SMALL, "timing": False},
    "deploy.torch": {
        **dict.fromkeys(["channels_last", "sparse24", "sparse_batch", "sparse_layers"], KEEP),
        "precision": _cpu_precision, "compile": _cpu_compile},
}
STAGE_COMMON = ("kind", "name", "from")

SECTION_RULES: dict[str, dict[str, Any]] = {
    # weights: a file another shipped recipe writes (see needed_files / producer)
    "model": dict.fromkeys(["arch", "stem", "num_classes", "in_channels",
                            "zero_init_residual", "weights"], KEEP),
    "data": {
        # root: the real files (installed, or written by this test where a checkout has them)
        **dict.fromkeys(["name", "root", "augment", "num_workers", "seed"], KEEP),
        "image_size": _at_most(32), "val_size": _at_most(SMALL), "calib_size": SMALL,
        "batch_size": SMALL, "train_limit": TRAIN_LIMIT, "test_limit": TEST_LIMIT},
    "measure": {"split": KEEP, "threads": KEEP, "max_eval_images": TEST_LIMIT,
                "batch_size": 4, "latency": False, "also_cpu": False},
    "report": dict.fromkeys(["accuracy_budget", "baseline"], KEEP),
}
TOP_RULES = {"name": KEEP, "seed": KEEP, "device": "cpu", "stages": KEEP,
             **dict.fromkeys(SECTION_RULES, KEEP)}
DATASETS = ("fashion_mnist", "cifar10")  # installed, or written here in the real format


def _apply(rules: dict[str, Any], given: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = sorted(set(given) - set(rules))
    if unknown:
        raise ShrinkError(f"{where}: no shrink rule for {unknown}; add one to "
                          "tests/test_shipped_recipes.py (KEEP only if it costs no time)")
    out = dict(given)
    for key, rule in rules.items():
        if isinstance(rule, _FirstOf):
            out[key] = rule(given[key]) if key in given else rule.default
        elif callable(rule):
            if key in given:
                out[key] = rule(given[key])
        elif rule is not KEEP:
            out[key] = rule
    return out


def shrink(raw: dict[str, Any], recipe_name: str) -> dict[str, Any]:
    """``raw`` (a recipe as read from YAML) made tiny, on the CPU.

    Raises:
        ShrinkError: an option, stage kind or dataset it does not know how to make small.
    """
    raw = copy.deepcopy(raw)
    out = _apply(TOP_RULES, raw, recipe_name)
    for section, rules in SECTION_RULES.items():
        out[section] = _apply(rules, raw.get(section) or {}, f"{recipe_name}: {section}")
    if out["data"].get("name", "fashion_mnist") not in DATASETS:
        raise ShrinkError(f"{recipe_name}: dataset {out['data']['name']!r}: the test cannot "
                          "provide its files; add a writer for them")
    dropped = CUDA_ONLY.get(recipe_name, {})
    stages, names = [], []
    for stage in raw.get("stages") or []:
        name, kind = stage.get("name", stage.get("kind")), stage.get("kind")
        names.append(name)
        if name in dropped:
            continue
        if kind not in STAGE_RULES:
            raise ShrinkError(f"{recipe_name}: stage {name!r}: no shrink rules for kind {kind!r}")
        rules = {**STAGE_RULES[kind], **dict.fromkeys(STAGE_COMMON, KEEP)}
        try:
            stages.append(_apply(rules, stage, f"{recipe_name}: stage {name!r} ({kind})"))
        except ShrinkError as exc:
            raise ShrinkError(f"{recipe_name}: stage {name!r} ({kind}): {exc}") from None
    stale = sorted(set(dropped) - set(names))
    if stale:
        raise ShrinkError(f"{recipe_name}: CUDA_ONLY names stages it does not have: {stale}")
    out["stages"] = stages
    stems = [out["model"].get("stem", "imagenet")]
    stems += [(s.get("student") or {}).get("stem", "imagenet") for s in stages]
    if "cifar" in stems:
        out["data"]["image_size"] = CIFAR_STEM_IMAGE_SIZE
    return out


# --- the files a recipe reads ------------------------------------------------------------

RUN_COMMAND = re.compile(r"netshrink run recipes/(\S+\.yaml) --out (\S+)")
STAGE_FILE = re.compile(r"(runs/[^/]+)/stages/\d\d-[^/]+/model\.safetensors")


def header(path: Path) -> str:
    return path.read_text().split("\nname:", 1)[0]


def out_dir(path: Path) -> str:
    """The run folder of the recipe's own ``netshrink run`` command in its header."""
    runs = [m.group(2) for m in RUN_COMMAND.finditer(header(path)) if m.group(1) == path.name]
    assert len(runs) == 1, f"{path.name}: its header should give its own command once"
    return runs[0]


def producer(weights: str) -> Path:
    """The shipped recipe whose header command writes the stage file ``weights``."""
    match = STAGE_FILE.fullmatch(weights)
    assert match, f"{weights}: not a stage file of a shipped recipe's run folder"
    found = [p for p in RECIPES if out_dir(p) == match.group(1)]
    assert len(found) == 1, f"{weights}: no shipped recipe's command writes {match.group(1)}"
    return found[0]


def needed_files(raw: dict[str, Any]) -> list[str]:
    """Model files a recipe reads: its model's weights, any stage's teacher or student."""
    files = [(raw.get("model") or {}).get("weights")]
    for stage in raw.get("stages") or []:
        files += [stage.get("teacher"), (stage.get("distill") or {}).get("teacher"),
                  (stage.get("student") or {}).get("weights")]
    return [str(f) for f in files if f]


# --- running -------------------------------------------------------------------------------


class Checkout:
    """A user's checkout: each shipped recipe run (once, shrunk) from ``root``, where its
    relative paths resolve (``data/cifar10``, ``runs/...``), into its header's ``--out``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs: dict[str, tuple[RunRecord, dict[str, Any]]] = {}

    def run(self, path: Path) -> tuple[RunRecord, dict[str, Any], Path]:
        out = self.root / out_dir(path)
        if path.name not in self.runs:
            raw = yaml.safe_load(path.read_text())
            small = shrink(raw, path.name)  # before anything runs: fails fast
            for weights in needed_files(raw):
                made_by = producer(weights)
                self.run(made_by)
                assert (self.root / weights).is_file(), \
                    f"{made_by.name} does not write {weights}, which {path.name} reads"
            if small["data"].get("name") == "cifar10":
                root = self.root / (small["data"].get("root") or "data/cifar10")
                if not root.exists():
                    write_cifar10_python(root, n_per_batch=TRAIN_LIMIT // 4, n_test=TEST_LIMIT)
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(self.root)
                record = run_recipe(parse_recipe(small, source=path.name), out,
                                    log=lambda _: None, progress=False)
            self.runs[path.name] = (record, small)
        return (*self.runs[path.name], out)


def check_finished(record: RunRecord, small: dict[str, Any], out: Path) -> None:
    """Every stage is done and left a file that its runtime opens and runs."""
    names = ["baseline", *(s.get("name", s["kind"]) for s in small["stages"])]
    assert [s.name for s in record.stages] == names
    assert (out / "run.json").is_file() and (out / "report.html").is_file()
    for stage in record.stages:
        assert stage.status == "done", stage.name
        assert stage.artifact is not None and stage.measurement is not None, stage.name
        file = out / stage.artifact
        assert file.exists(), f"{stage.name}: {file} missing"
        m = stage.measurement
        if stage.index > 0 or small["model"].get("weights"):
            assert m.accuracy is not None, f"{stage.name}: not evaluated"
        stats = ModelStats(params=m.params, nonzero_params=m.nonzero_params, macs=m.macs)
        model = open_runtime(file, m.runtime, stats=stats, precision=m.precision,
                             options=m.runtime_options or None, input_shape=m.input_shape)
        try:
            with torch.no_grad():
                logits = model(torch.zeros(2, *m.input_shape, dtype=input_dtype(model)))
        finally:
            if isinstance(model, Executable):
                model.close()
        assert logits.shape[0] == 2 and torch.isfinite(logits.float()).all(), stage.name


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Checkout:
    return Checkout(tmp_path_factory.mktemp("checkout"))


def test_every_recipe_is_covered() -> None:
    assert any(p.name == "quickstart.yaml" for p in RECIPES)
    assert set(SLOW) | set(CUDA_ONLY) <= {p.name for p in RECIPES}, "a stale entry"
    assert len(SLOW) <= len(RECIPES) / 2, "most shipped recipes should run by default"


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=[pytest.mark.slow] if p.name in SLOW else [], id=p.stem)
    for p in RECIPES])
def test_shipped_recipe_runs_shrunk(path: Path, checkout: Checkout) -> None:
    raw = yaml.safe_load(path.read_text())
    text = header(path)
    own = text.find(f"netshrink run recipes/{path.name} --out {out_dir(path)}")
    for weights in needed_files(raw):
        # The header says how the file it reads is made: the producer's command first.
        made_by = producer(weights)
        first = text.find(f"netshrink run recipes/{made_by.name} --out {out_dir(made_by)}")
        assert 0 <= first < own, \
            f"{path.name}: its header should give the command that writes {weights} first"
    record, small, out = checkout.run(path)
    check_finished(record, small, out)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipes_a_header_names_exist(path: Path) -> None:
    for name in re.findall(r"recipes/([\w.-]+\.yaml)", path.read_text()):
        assert (ROOT / "recipes" / name).is_file(), f"{path.name} names recipes/{name}"


def test_shrink_refuses_what_it_does_not_know() -> None:
    base = {"model": {"arch": "resnet18"}, "data": {"name": "fashion_mnist"},
            "stages": [{"kind": "train", "epochs": 30}]}
    small = shrink(base, "r")
    assert small["stages"] == [{"kind": "train", "epochs": 1, "max_steps": 1,
                                "batch_size": SMALL}]
    assert small["data"]["train_limit"] == TRAIN_LIMIT and small["device"] == "cpu"
    bad = [
        {**base, "stages": [{"kind": "train", "epochs": 3, "new_option": 1}]},
        {**base, "stages": [{"kind": "quant.unknown"}]},
        {**base, "data": {"name": "fashion_mnist", "new_option": 1}},
        {**base, "data": {"name": "imagenet"}},
        {**base, "stages": [{"kind": "deploy.torch", "precision": "fp16"}]},
        {**base, "stages": [{"kind": "deploy.torch", "compile": "max-autotune"}]},
        {**base, "stages": [{"kind": "export.tensorrt", "runtime": "tensorrt"}]},
        {**base, "extra_section": {}},
    ]
    for raw in bad:
        with pytest.raises(ShrinkError):
            shrink(raw, "r")
