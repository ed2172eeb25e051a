"""One method table behind the three entry points: the Python verb, a recipe stage and the
CLI command run the same handler, so the same method, settings and seed give the same
model; one set of defaults, one export-and-check, one size rule."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn

import netshrink
from custom_models import make_tiny
from netshrink.cli import build_parser, main
from netshrink.cli.prune import DEFAULT_RATIO, prune_stage
from netshrink.data import DataBundle, DataConfig, build_data
from netshrink.errors import UserError
from netshrink.models import ModelSpec, randomized_model
from netshrink.recipe import parse_recipe, run_recipe
from netshrink.runtime.sessions import onnx_precision
from netshrink.stages.base import METHODS, STAGES, load_builtin_stages, method_of
from netshrink.stages.distill import KDConfig
from netshrink.store.checkpoint import save_model

SPEC = ModelSpec(arch="resnet_tiny", num_classes=10, in_channels=1, stem="cifar")
FASHION = {"dataset": "fashion_mnist"}
X = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A student and a teacher file (random weights and BN statistics)."""
    root = tmp_path_factory.mktemp("road")
    student, teacher = root / "student.safetensors", root / "teacher.safetensors"
    save_model(randomized_model(SPEC, seed=0), SPEC, student, meta=FASHION)
    save_model(randomized_model(SPEC, seed=1), SPEC, teacher, meta=FASHION)
    return student, teacher


@pytest.fixture(scope="module")
def data(fashion_dir: Path) -> DataBundle:
    """The splits a recipe (and so a command) on the same data section builds."""
    return build_data(DataConfig(name="fashion_mnist", root=fashion_dir))


# Each method as a recipe stage (all from the same baseline), a command, a verb call.
STAGES_RUN = [
    {"kind": "prune.magnitude", "name": "magnitude", "ratio": 0.5},
    {"kind": "prune.channel", "name": "channel", "ratio": 0.5},
    {"kind": "quant.ptq", "name": "int8"},
    {"kind": "quant.kmeans", "name": "kmeans", "bits": 4},
    {"kind": "distill.kd", "name": "kd", "max_steps": 1},
]
COMMANDS = {
    "magnitude": ["prune", "--method", "magnitude", "--ratio", "0.5"],
    "channel": ["prune", "--method", "channel", "--ratio", "0.5"],
    "int8": ["quantize", "--method", "ptq"],
    "kmeans": ["quantize", "--method", "kmeans", "--bits", "4"],
    "kd": ["distill", "--arch", "resnet_tiny", "--stem", "cifar", "--max-steps", "1"],
}


@pytest.fixture(scope="module")
def recipe_files(files, fashion_dir, tmp_path_factory) -> dict[str, Path]:
    """What each method's recipe stage left, by stage name (one run, one baseline)."""
    student, teacher = files
    stages = [{**s, "from": "baseline"} | ({"teacher": str(teacher)} if s["name"] == "kd"
                                          else {}) for s in STAGES_RUN]
    raw = {"name": "road", "model": {"arch": "resnet_tiny", "stem": "cifar",
                                     "weights": str(student)},
           "data": {"name": "fashion_mnist", "root": str(fashion_dir)},
           "measure": {"latency": False}, "stages": stages}
    out = tmp_path_factory.mktemp("recipe")
    record = run_recipe(parse_recipe(raw), out, report=False, log=lambda _: None)
    return {s.name: out / s.artifact for s in record.stages[1:]}


def command_file(name: str, files: tuple[Path, Path], fashion_dir: Path, out: Path) -> Path:
    """What the CLI command of ``name`` left."""
    student, teacher = files
    argv = [*COMMANDS[name], "--weights", str(student), "--data-dir", str(fashion_dir),
            "--no-timing", "--out", str(out)]
    if name == "kd":
        argv += ["--teacher", str(teacher)]
    assert main(argv) == 0
    record = json.loads((out / "run.json").read_text())
    return out / record["stages"][-1]["artifact"]


def torch_weights(path: Path) -> dict[str, torch.Tensor]:
    return netshrink.load(path).model.state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                        atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key  # the same channels kept
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=0), key


def ort_logits(path: Path) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: X.numpy()})[0])


def verb_result(name: str, files: tuple[Path, Path], data: DataBundle) -> netshrink.Compressed:
    """The Python verb of ``name``, with the recipe's settings on the recipe's splits."""
    student, teacher = files
    model = netshrink.load(student)
    settings = {k: v for k, v in next(s for s in STAGES_RUN if s["name"] == name).items()
                if k not in ("kind", "name")}
    if name == "magnitude":
        return netshrink.prune(model, netshrink.MagnitudePruneConfig(**settings))
    if name == "channel":
        return netshrink.prune(model, netshrink.ChannelPruneConfig(**settings), data=data.train)
    if name == "int8":
        return netshrink.quantize(model, netshrink.PTQConfig(**settings),
                                  calibration=data.calib)
    if name == "kmeans":
        return netshrink.quantize(model, netshrink.KMeansConfig(**settings), data=data.train)
    return netshrink.distill(model, netshrink.load(teacher), data.train,
                             netshrink.DistillConfig(**settings), val=data.val)


@pytest.mark.parametrize("name", [s["name"] for s in STAGES_RUN])
def test_verb_stage_and_command_give_the_same_result(name, files, data, fashion_dir,
                                                     recipe_files, tmp_path,
                                                     monkeypatch) -> None:
    # The command's report (plots: seconds) is not what is compared here.
    monkeypatch.setattr("netshrink.report.render_report",
                        lambda out: (out / "report.md", out / "report.html"))
    staged = recipe_files[name]
    commanded = command_file(name, files, fashion_dir, tmp_path / "cli")
    result = verb_result(name, files, data)
    if name == "int8":  # the same INT8 graph: the same outputs in ONNX Runtime
        assert result.precision == "int8" and onnx_precision(result.file) == "int8"
        want = ort_logits(staged)
        for path in (commanded, result.file):
            assert torch.allclose(ort_logits(path), want, atol=1e-5)
        return
    weights = result.model.state_dict()
    # Distillation trains: the same steps on the same batches, to float rounding.
    atol = 0.0
    assert_same_weights(weights, torch_weights(staged), atol)
    assert_same_weights(weights, torch_weights(commanded), atol)
    if name == "channel":
        assert weights["conv1.weight"].shape[0] == 4  # 8 channels, half removed
    if name == "magnitude":
        conv = weights["layer1.0.conv1.weight"]
        assert int((conv == 0).sum()) == conv.numel() // 2  # exact, per layer
    if name == "kmeans":
        assert weights["layer1.0.conv1.weight"].unique().numel() <= 2 ** 4 + 1
    if name == "kd":  # one step taken (warm-up: at lr/100): the student moved
        assert not torch.equal(weights["conv1.weight"], torch_weights(files[0])["conv1.weight"])


def test_one_set_of_defaults() -> None:
    """The verb's, the stage's and the command's defaults are the config class's."""
    kd = KDConfig(teacher=Path("t.safetensors"))
    shared = set(netshrink.TrainConfig.model_fields) | {"alpha", "temperature"}
    assert netshrink.DistillConfig().model_dump(include=shared) == kd.model_dump(include=shared)
    parse = build_parser().parse_args
    args = parse(["distill", "--teacher", "t", "--out", "o"])
    assert (args.epochs, args.lr, args.batch_size, args.alpha, args.temperature) == (
        kd.epochs, kd.lr, kd.batch_size, kd.alpha, kd.temperature)
    train, fresh = parse(["train", "--out", "o"]), netshrink.TrainConfig()
    assert (train.epochs, train.lr, train.batch_size, train.optimizer) == (
        fresh.epochs, fresh.lr, fresh.batch_size, fresh.optimizer)
    # prune passes only the flags given: the stage's config fills in its own defaults
    prune = parse(["prune", "--weights", "w", "--method", "channel", "--out", "o"])
    stage = prune_stage(prune)
    assert stage == {"kind": "prune.channel", "ratio": DEFAULT_RATIO}
    assert parse_recipe({"name": "d", "stages": [stage]}).parsed_stages()[0].config == (
        netshrink.ChannelPruneConfig(ratio=DEFAULT_RATIO))
    nm = prune_stage(parse(["prune", "--weights", "w", "--method", "nm", "--out", "o"]))
    assert nm == {"kind": "prune.nm"}
    ptq = netshrink.PTQConfig()
    quant = parse(["quantize", "--weights", "w", "--method", "ptq", "--out", "o"])
    assert (quant.runtime, quant.calibration, not quant.per_tensor) == (
        ptq.runtime, ptq.calibration, ptq.per_channel)


def test_the_table_has_one_stage_per_config_and_the_verbs_take_their_family() -> None:
    load_builtin_stages()
    for name in STAGES.names():
        assert METHODS[STAGES.get(name).config] == name  # found by its config's type
    assert method_of(netshrink.DistillConfig())[0] == "distill.kd"  # a subclass: its base's
    with pytest.raises(UserError, match=r"quantize takes .*PTQConfig.*not ChannelPruneConfig"
                       r" \(the prune.channel method: netshrink.prune\)"):
        netshrink.quantize(make_tiny(), netshrink.ChannelPruneConfig(ratio=0.5))


def test_export_of_an_int8_result_writes_the_int8_file(files, data, tmp_path) -> None:
    int8 = netshrink.quantize(netshrink.load(files[0]), calibration=data.calib)
    written = netshrink.export(int8, tmp_path / "q.onnx")
    assert onnx_precision(tmp_path / "q.onnx") == "int8"
    assert (tmp_path / "q.onnx").read_bytes() == int8.file.read_bytes()
    assert torch.equal(written(X), int8(X))
    half = netshrink.quantize(make_tiny(), netshrink.Fp16Config(), example_input=X[:1])
    with pytest.raises(UserError, match="float16 weights; export the float32 model"):
        netshrink.export(half, tmp_path / "h.onnx")  # never a float model in its place
    assert not (tmp_path / "h.onnx").exists()


def test_an_openvino_ir_counts_xml_and_bin_and_is_not_exported_as_onnx(files, data,
                                                                      tmp_path) -> None:
    ir = netshrink.quantize(netshrink.load(files[0]),
                            netshrink.PTQConfig(runtime="openvino", calibration_images=64),
                            calibration=data.calib, out=tmp_path / "ov")
    xml = tmp_path / "ov" / "model.xml"
    both = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    assert ir.file == xml and xml.with_suffix(".bin").stat().st_size > xml.stat().st_size / 10
    quick = netshrink.MeasureOptions(latency=False, memory=False)
    assert ir.measure(options=quick).size_bytes == both
    assert netshrink.measure(xml, options=quick).size_bytes == both
    with pytest.raises(UserError, match=r"openvino file \(model.xml\), not ONNX") as refused:
        netshrink.export(ir, tmp_path / "x.onnx")
    assert "\n" not in str(refused.value) and not (tmp_path / "x.onnx").exists()


class Drifting(nn.Module):
    """Adds how often it was called: its ONNX export (one traced call) cannot match it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, 10)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.conv(x).mean((2, 3))) + float(self.calls)


def test_python_quantize_checks_the_onnx_export_against_torch(tmp_path) -> None:
    calib = [torch.randn(8, 1, 28, 28)]
    with pytest.raises(UserError, match="ONNX export differs from torch"):
        netshrink.quantize(Drifting(), calibration=calib, out=tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_kmeans_of_a_users_model_saves_a_smaller_file(tmp_path) -> None:
    torch.manual_seed(0)
    model = make_tiny(32)
    shared = netshrink.quantize(model, netshrink.KMeansConfig(bits=4),
                                example_input=torch.zeros(1, 1, 28, 28))
    factory = {"factory": "custom_models:make_tiny", "factory_kwargs": {"width": 32}}
    packed = shared.save(tmp_path / "m.nspk", **factory)
    dense = shared.save(tmp_path / "m.safetensors", **factory)
    assert packed.stat().st_size < dense.stat().st_size / 4
    again = netshrink.load(packed, trust=["custom_models:make_tiny"])
    assert torch.equal(again(X), shared(X))


def test_held_out_methods_run_in_python_once_val_is_given(data) -> None:
    """Sensitivity-scope channel pruning and the accuracy budget of PTQ decide on ``val``
    (not the training or test images): given it, they run from Python as in a recipe."""
    torch.manual_seed(0)
    model, x = make_tiny(16), torch.zeros(1, 1, 28, 28)
    sensitivity = netshrink.ChannelPruneConfig(ratio=0.3, scope="sensitivity", scan_images=32)
    with pytest.raises(UserError, match="give val= in Python"):
        netshrink.prune(model, sensitivity, example_input=x)
    pruned = netshrink.prune(model, sensitivity, val=data.val)
    assert "sensitivity" in pruned.notes[-1] and pruned.model.conv1.out_channels < 16
    budget = netshrink.PTQConfig(accuracy_budget=1.0, budget_images=32, calibration_images=32)
    with pytest.raises(UserError, match="give val= in Python"):
        netshrink.quantize(model, budget, calibration=data.calib)
    mixed = netshrink.quantize(model, budget, calibration=data.calib, val=data.val)
    assert mixed.precision == "int8" and "automatic mixed precision" in mixed.notes[-1]
