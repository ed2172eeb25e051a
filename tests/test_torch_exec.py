"""torch as a runtime: precisions, channels_last, torch.compile and the ``deploy.torch``
stage, on a CPU here and on CUDA where one exists (``gpu`` marker)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from netshrink.bench import MeasureOptions, measure
from netshrink.cli import main
from netshrink.errors import UserError
from netshrink.models import ModelSpec, randomized_model
from netshrink.recipe import parse_recipe, run_recipe
from netshrink.runtime.torch_exec import TorchExecutable, TorchExecution, prepare_torch
from netshrink.store.checkpoint import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
SHAPE = [3, 16, 16]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny() -> torch.nn.Module:
    return randomized_model(ModelSpec(arch="resnet_tiny", num_classes=10, stem="cifar"))


def images(n: int = 8) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1))


def test_bf16_channels_last_matches_fp32_and_leaves_the_model_alone() -> None:
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    prepared = prepare_torch(model, TorchExecution(precision="bf16", channels_last=True),
                             device="cpu", input_shape=SHAPE)
    x = images()
    with torch.inference_mode():
        want, got = model(x), prepared(x)
    assert got.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: logits agree to a few percent of their scale.
    assert (got.float() - want).abs().max() <= 0.05 * want.abs().max()
    inner = next(prepared.inner.parameters())
    assert inner.dtype == torch.bfloat16
    assert prepared.inner.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for key, value in model.state_dict().items():  # the caller's model is untouched
        assert value.dtype == before[key].dtype and torch.equal(value, before[key])


def test_compiled_model_matches_eager() -> None:
    model = tiny()
    prepared = prepare_torch(model, TorchExecution(compile="default"), device="cpu",
                             input_shape=SHAPE)
    x = images(4)
    with torch.inference_mode():
        assert torch.allclose(prepared(x), model(x), atol=1e-4, rtol=1e-4)


def test_measurement_records_how_the_model_was_prepared() -> None:
    execution = TorchExecution(precision="bf16", channels_last=True)
    prepared = prepare_torch(tiny(), execution, device="cpu", input_shape=SHAPE)
    assert copy.deepcopy(prepared) is prepared  # measuring works on it, not on a copy
    m = measure(prepared, input_shape=SHAPE,
                options=MeasureOptions(batch_size=4, warmup=1, latency_runs=2,
                                       throughput_warmup=1, throughput_runs=2,
                                       min_seconds=None))
    assert m.runtime == "torch" and m.precision == "bf16"
    assert m.runtime_options == {"precision": "bf16", "channels_last": True}
    assert TorchExecution(**m.runtime_options) == execution
    assert execution.label() == "bf16, channels_last"
    assert m.params == prepared.stats.params and m.macs == prepared.stats.macs


@pytest.mark.parametrize(("execution", "message"), [
    (TorchExecution(precision="fp16"), "NVIDIA GPU"),
    (TorchExecution(precision="tf32"), "NVIDIA GPU"),
    (TorchExecution(sparse24="auto"), "NVIDIA GPU"),
])
def test_gpu_only_options_refuse_a_cpu(execution: TorchExecution, message: str) -> None:
    with pytest.raises(UserError, match=message):
        prepare_torch(tiny(), execution, device="cpu", input_shape=SHAPE)


def test_unknown_option_is_refused() -> None:
    with pytest.raises(ValueError, match="compile"):
        TorchExecution(compile="fastest")


def _deploy_recipe(fashion_dir: Path, deploy: dict, *, batch_size: int = 8) -> object:
    return parse_recipe({
        "name": "t",
        "model": {"arch": "resnet_tiny"},
        "data": {"name": "fashion_mnist", "root": str(fashion_dir), "calib_size": 32},
        "measure": {"latency": True, "batch_size": batch_size},
        "stages": [{"kind": "train", "epochs": 1, "lr": 0.05, "batch_size": 32,
                    "max_steps": 3}, {"kind": "deploy.torch", **deploy}],
    })


@pytest.mark.slow  # ~32 s: two timed deploy runs; the options' effects are tested above
def test_deploy_stage_measures_the_prepared_model_and_remeasures_it_alike(
        fashion_dir: Path, tmp_path: Path) -> None:
    deploy = {"precision": "bf16", "channels_last": True}
    record = run_recipe(_deploy_recipe(fashion_dir, deploy), tmp_path, log=lambda _: None,
                        report=False)
    trained, deployed = record.stages[1], record.stages[2]
    m = deployed.measurement
    assert m.runtime == "torch" and m.precision == "bf16"
    assert m.runtime_options == deploy
    file = tmp_path / deployed.artifact
    assert file.name == "model.bf16.safetensors"
    # Half the bytes of the fp32 file, less the header both have.
    assert m.size_bytes < 0.55 * trained.measurement.size_bytes
    _, _, meta = load_model(file)
    assert meta["precision"] == "bf16"
    # bf16 loses little: the same images mostly get the same class.
    assert abs(m.accuracy.top1 - trained.measurement.accuracy.top1) <= 0.05
    # A new measure section re-measures the file, prepared the same way.
    again = run_recipe(_deploy_recipe(fashion_dir, deploy, batch_size=4), tmp_path,
                       log=lambda _: None, report=False)
    assert again.stages[2].measurement.runtime_options == deploy
    assert again.stages[2].measurement.throughput.batch_size == 4


def test_deploy_stage_refuses_fp16_on_a_cpu_recipe(fashion_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="NVIDIA GPU"):
        run_recipe(_deploy_recipe(fashion_dir, {"precision": "fp16"}), tmp_path,
                   log=lambda _: None, report=False)


def test_cli_bench_prepares_the_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    code = main(["bench", "--arch", "resnet_tiny", "--stem", "cifar", "--num-classes", "10",
                 "--input", "3x16x16", "--batch-size", "4", "--repeats", "1",
                 "--min-seconds", "0", "--precision", "bf16", "--channels-last",
                 "--json", str(out)])
    assert code == 0
    assert "torch execution: bf16, channels_last" in capsys.readouterr().out
    assert '"precision": "bf16"' in out.read_text()
    assert main(["bench", "--arch", "resnet_tiny", "--precision", "fp16", "--repeats", "1"]) == 2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("execution", [
    TorchExecution(precision="fp16", channels_last=True),
    TorchExecution(precision="bf16", channels_last=True, compile="reduce-overhead"),
    TorchExecution(precision="tf32"),
])
def test_cuda_preparations_match_fp32(execution: TorchExecution) -> None:
    model = tiny()
    prepared = prepare_torch(model, execution, device="cuda", input_shape=SHAPE)
    x = images()
    with torch.inference_mode():
        want = model(x)
        for _ in range(3):  # CUDA graphs record on a later call: check the replayed one
            got = prepared(x).float().cpu()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    m = measure(prepared, input_shape=SHAPE,
                options=MeasureOptions(device="cuda", batch_size=8, warmup=3, latency_runs=5,
                                       throughput_warmup=3, throughput_runs=5,
                                       min_seconds=None))
    assert m.memory_kind == "cuda" and m.peak_memory_mb > 0 and m.environment.gpu
    assert isinstance(prepared, TorchExecutable) and m.runtime_options == prepared.options


@pytest.mark.gpu
@needs_cuda
def test_cuda_deploy_stage_in_a_recipe(fashion_dir: Path, tmp_path: Path) -> None:
    recipe = _deploy_recipe(fashion_dir, {"precision": "fp16", "channels_last": True,
                                          "compile": "reduce-overhead"})
    recipe = recipe.model_copy(update={"device": "cuda"})
    record = run_recipe(recipe, tmp_path, log=lambda _: None)
    m = record.stages[2].measurement
    assert m.environment.device == "cuda" and m.memory_kind == "cuda"
    assert m.precision == "fp16" and m.accuracy.top1 > 0
    assert "GPU" in (tmp_path / "report.md").read_text()


def test_an_fp16_file_reloads_for_any_device(tmp_path: Path) -> None:
    model = tiny()
    path = tmp_path / "m.fp16.safetensors"
    save_model(copy.deepcopy(model).half(), ModelSpec(arch="resnet_tiny", num_classes=10,
                                                      stem="cifar"), path,
               meta={"precision": "fp16"})
    loaded, _, _ = load_model(path)
    with torch.inference_mode():
        assert torch.allclose(loaded(images(2)), model(images(2)), atol=0.05)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_over_2to4_sparse_layers_match_dense() -> None:
    """torch.compile with CUDA graphs over semi-structured weights (compile + 2:4 is the
    fastest combination if it works; if this fails, refuse the combination clearly)."""
    from netshrink.prune.nm import NMPruneConfig, prune_nm

    spec = ModelSpec(arch="resnet18", num_classes=10, stem="cifar")
    model = prune_nm(randomized_model(spec), NMPruneConfig())[0]
    execution = TorchExecution(precision="fp16", channels_last=True, sparse24="all",
                               compile="reduce-overhead", sparse_batch=32)
    prepared = prepare_torch(model, execution, device="cuda", input_shape=[3, 32, 32])
    assert any(r.used for r in prepared.sparse_report)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(x)
        for _ in range(3):  # warm-up, record, replay
            got = prepared(x).float().cpu()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


@pytest.mark.gpu
@needs_cuda
def test_cuda_deploy_stage_with_2to4_auto_records_its_choice(fashion_dir: Path,
                                                            tmp_path: Path) -> None:
    recipe = parse_recipe({
        "name": "t", "device": "cuda",
        "model": {"arch": "resnet18", "stem": "cifar"},
        "data": {"name": "fashion_mnist", "root": str(fashion_dir), "calib_size": 32},
        "measure": {"latency": True, "batch_size": 32},
        "stages": [{"kind": "train", "epochs": 1, "lr": 0.05, "batch_size": 32, "max_steps": 3},
                   {"kind": "prune.nm"},
                   {"kind": "deploy.torch", "precision": "fp16", "channels_last": True,
                    "sparse24": "auto", "sparse_batch": 32}],
    })
    record = run_recipe(recipe, tmp_path, log=lambda _: None, report=False)
    stage = record.stages[-1]
    assert (tmp_path / "stages" / f"{stage.index:02d}-{stage.name}" / "sparse24.md").is_file()
    options = stage.measurement.runtime_options
    assert options["sparse24"] == "auto" and isinstance(options["sparse_layers"], list)
    assert stage.measurement.accuracy.top1 >= record.stages[2].measurement.accuracy.top1 - 0.05


def _shrunk_gpu_quickstart(fashion_dir: Path, device: str, *, also_cpu: bool = False
                           ) -> object:
    """recipes/quickstart_gpu.yaml with every training stage cut to one small step and
    latency off: the same stage chain, in seconds."""
    from netshrink.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "quickstart_gpu.yaml")
    stages = []
    for stage in recipe.stages:
        if stage["kind"] in ("train", "distill.kd", "finetune"):
            stage = {**stage, "max_steps": 1, "batch_size": 16}
        if stage["kind"] == "deploy.torch" and device == "cpu":
            stage = {**stage, "precision": "bf16", "compile": "off"}
        stages.append(stage)
    return recipe.model_copy(update={
        "device": device, "stages": stages,
        "data": recipe.data.model_copy(update={"root": fashion_dir, "calib_size": 32}),
        "measure": recipe.measure.model_copy(update={"latency": also_cpu,
                                                     "also_cpu": also_cpu}),
    })


@pytest.mark.slow
def test_gpu_quickstart_stage_chain_runs_on_a_cpu(fashion_dir: Path, tmp_path: Path) -> None:
    record = run_recipe(_shrunk_gpu_quickstart(fashion_dir, "cpu"), tmp_path,
                        log=lambda _: None)
    names = [s.name for s in record.stages]
    assert names[-3:] == ["int8", "tensorrt", "fp16-cudagraphs"]
    assert all(s.measurement is not None for s in record.stages)
    assert (tmp_path / "report.md").is_file()


@pytest.mark.gpu
@needs_cuda
def test_gpu_quickstart_stage_chain_runs_on_cuda(fashion_dir: Path, tmp_path: Path) -> None:
    record = run_recipe(_shrunk_gpu_quickstart(fashion_dir, "cuda", also_cpu=True), tmp_path,
                        log=lambda _: None)
    last = record.stages[-1].measurement
    assert last.environment.device == "cuda" and last.precision == "fp16"
    teacher = next(s for s in record.stages if s.name == "teacher")
    assert teacher.measurement.memory_kind == "cuda"
    assert teacher.cpu_measurement.environment.device == "cpu"
    report = (tmp_path / "report.md").read_text()
    assert "GPU" in report
    # measure.also_cpu: the INT8 row (ONNX Runtime, CPU) is compared with the teacher's
    # CPU timing instead of being "not comparable".
    int8 = next(line for line in report.splitlines() if line.startswith("| int8 |"))
    assert "other device" not in int8
