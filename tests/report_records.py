"""Synthetic run records and run folders for the report tests (no training, no timing).

``make_record`` is a three-stage CPU run; ``table_rows`` / ``subtable_rows`` read the
rendered Markdown tables back, so tests compare the cells a reader sees.
"""

from __future__ import annotations

import re
from pathlib import Path

from netshrink.bench.schema import Accuracy, Environment, Latency, Measurement
from netshrink.stages.record import EpochRecord, RunRecord, StageRecord

ENV = Environment(
    cpu="AMD EPYC 9R14 (2 cores, avx512_vnni, avx512_bf16)",
    cores=2,
    threads=2,
    seed=0,
    python="3.11.2",
    versions={"torch": "2.13.0+cpu", "netshrink": "0.1.0", "numpy": "2.1.0"},
    platform="Linux-6.1.0-x86_64-with-glibc2.36",
)


def _latency(batch: int, p50: float, runs: int = 100) -> Latency:
    return Latency(
        batch_size=batch,
        runs=runs,
        warmup=10,
        p50_ms=p50,
        p90_ms=p50 * 1.08,
        mean_ms=p50 * 1.02,
        min_ms=p50 * 0.95,
        max_ms=p50 * 1.3,
        std_ms=p50 * 0.04,
        images_per_s=batch / (p50 / 1000),
    )


def _measurement(
    size_mb: float, params: int, nonzero: int, p50: float, top1: float, precision: str = "fp32",
    *, runtime: str = "torch", batch_ms: float | None = None,
) -> Measurement:
    """``batch_ms``: the batch-64 call's p50 (default ``20 * p50``, so throughput ratios
    equal latency ratios)."""
    return Measurement(
        runtime=runtime,
        precision=precision,
        input_shape=[1, 28, 28],
        file="stage/model.safetensors",
        size_bytes=int(size_mb * 1_000_000),
        params=params,
        nonzero_params=nonzero,
        macs=params * 40,
        latency=_latency(1, p50),
        throughput=_latency(64, batch_ms if batch_ms is not None else p50 * 20, runs=20),
        peak_memory_mb=310.5,
        memory_kind="rss",
        accuracy=Accuracy(split="test", images=10_000, top1=top1, top5=0.998, loss=0.17),
        environment=ENV,
    )


def _history(n: int, start_loss: float) -> list[EpochRecord]:
    return [
        EpochRecord(
            epoch=e,
            train_loss=start_loss / e,
            train_top1=0.90 + 0.01 * e,
            val_top1=0.91 + 0.008 * e,
            lr=0.1 / (10 ** (e - 1)),
            seconds=42.5 + e,
        )
        for e in range(1, n + 1)
    ]


def make_record(budget: float | None = 0.5) -> RunRecord:
    """Baseline, a stage 4x smaller and 2x faster, and one neither smaller nor faster."""
    recipe: dict = {"name": "lenet-mnist", "model": "lenet", "stages": [{"kind": "quantize"}]}
    if budget is not None:
        recipe["report"] = {"accuracy_budget": budget}
    return RunRecord(
        name="lenet-mnist",
        recipe=recipe,
        recipe_sha256="ab" * 32,
        netshrink_version="0.1.0",
        created="2025-01-02T03:04:05+00:00",
        updated="2025-01-02T04:05:06+00:00",
        stages=[
            StageRecord(
                index=0,
                name="baseline",
                kind="baseline",
                measurement=_measurement(40.0, 10_000_000, 10_000_000, 20.0, 0.9512),
                started="2025-01-02T03:04:05+00:00",
                seconds=3.2,
            ),
            StageRecord(
                index=1,
                name="prune_quant",
                kind="quantize",
                measurement=_measurement(10.0, 10_000_000, 5_000_000, 10.0, 0.9471, "int8"),
                history=_history(3, 0.9),
                started="2025-01-02T03:10:00+00:00",
                seconds=130.0,
                notes=["calibrated on 512 images"],
            ),
            StageRecord(
                index=2,
                name="finetune",
                kind="finetune",
                measurement=_measurement(39.8, 10_000_000, 10_000_000, 19.5, 0.9530),
                history=_history(2, 0.5),
                started="2025-01-02T03:40:00+00:00",
                seconds=85.0,
            ),
        ],
    )


GPU_ENV = ENV.model_copy(update={"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"})
def _on_gpu(m: Measurement, memory_mb: float) -> Measurement:
    return m.model_copy(update={"environment": GPU_ENV, "memory_kind": "cuda",
                                "peak_memory_mb": memory_mb})


def gpu_record() -> RunRecord:
    """A CUDA run: torch stages timed on the GPU, the ONNX Runtime stage on the CPU."""
    base = _on_gpu(_measurement(40.0, 10_000_000, 10_000_000, 2.0, 0.9512), 800.0)
    pruned = _on_gpu(_measurement(10.0, 2_500_000, 2_500_000, 1.0, 0.9490), 400.0)
    int8 = _measurement(10.0, 10_000_000, 10_000_000, 8.0, 0.9500, "int8")
    record = make_record(budget=1.0)
    record.stages = [
        StageRecord(index=i, name=name, kind=kind, measurement=m,
                    started="2025-01-02T03:04:05+00:00")
        for i, (name, kind, m) in enumerate((
            ("baseline", "baseline", base),
            ("pruned", "prune.channel", pruned),
            ("int8", "quant.ptq", int8),
        ))
    ]
    return record


def gpu_record_with_cpu_timings() -> RunRecord:
    """``gpu_record`` from a recipe with ``measure.also_cpu``: the torch stages also timed
    on the CPU (baseline 16 ms, pruned 10 ms at batch 1), without accuracy."""
    record = gpu_record()
    for stage, p50 in zip(record.stages[:2], (16.0, 10.0), strict=True):
        cpu = _measurement(stage.measurement.size_bytes / 1e6, stage.measurement.params,
                           stage.measurement.nonzero_params, p50, 0.0)
        stage.cpu_measurement = cpu.model_copy(update={"accuracy": None})
    return record


UNTRAINED_NOTE = ("a fresh, untrained model: parameters, MACs and size recorded; accuracy "
                  "and speed are measured once trained")


def make_quickstart_record(report: dict | None = None) -> RunRecord:
    """The quickstart's shape: a fresh ResNet-50 counted and sized only (no accuracy, no
    speed), ``train`` (the teacher, 100 MB, 40 ms, 93.00%), ``kd`` (a ResNet-18 student,
    40 MB, 16 ms, 92.50%), ``prune`` (channels, 20 MB, 10 ms, 92.20%) and ``int8``
    (5 MB, 5 ms, 91.80%). ``report`` is the recipe's ``report:`` section."""
    fresh = _measurement(100.0, 25_000_000, 25_000_000, 40.0, 0.0).model_copy(update={
        "accuracy": None, "latency": None, "throughput": None, "peak_memory_mb": None,
        "memory_kind": None})
    stages = [
        ("baseline", "baseline", fresh, [UNTRAINED_NOTE]),
        ("train", "train", _measurement(100.0, 25_000_000, 25_000_000, 40.0, 0.9300), []),
        ("kd", "distill.kd", _measurement(40.0, 10_000_000, 10_000_000, 16.0, 0.9250), []),
        ("prune", "prune.channel", _measurement(20.0, 5_000_000, 5_000_000, 10.0, 0.9220), []),
        ("int8", "quant.ptq",
         _measurement(5.0, 5_000_000, 5_000_000, 5.0, 0.9180, "int8"), []),
    ]
    record = make_record()
    record.name = "quickstart"
    record.recipe = {
        "name": "quickstart", "model": {"arch": "resnet50"},
        "stages": [{"kind": kind, "name": name} for name, kind, *_ in stages[1:]],
        "report": report if report is not None else {"accuracy_budget": 1.0},
    }
    record.stages = [
        StageRecord(index=i, name=name, kind=kind, measurement=m, notes=notes,
                    started="2025-01-02T03:04:05+00:00")
        for i, (name, kind, m, notes) in enumerate(stages)
    ]
    return record


def make_runtime_record() -> RunRecord:
    """The quickstart as measured on a 2-core AVX2 VM: a ResNet-50 teacher in eager torch
    (20.2 ms at batch 1, 94.3 MB), its ``export.onnx`` stage in ONNX Runtime (6.95 ms),
    a distilled, channel-pruned and fine-tuned ResNet-18 in torch, and that student in
    ONNX Runtime INT8 (0.48 ms, 7.2 MB). ``report.baseline: teacher``."""
    r50, r18, pruned = 23_520_000, 11_180_000, 7_120_000

    def m(size: float, params: int, p50: float, batch_ms: float, top1: float,
          precision: str = "fp32", runtime: str = "torch") -> Measurement:
        return _measurement(size, params, params, p50, top1, precision, runtime=runtime,
                            batch_ms=batch_ms)

    fresh = m(94.3, r50, 20.0, 400.0, 0.0).model_copy(update={
        "accuracy": None, "latency": None, "throughput": None, "peak_memory_mb": None,
        "memory_kind": None})
    stages = [
        ("baseline", "baseline", fresh, [UNTRAINED_NOTE]),
        ("teacher", "train", m(94.3, r50, 20.2, 212.6, 0.9095), []),
        ("teacher-onnx", "export.onnx",
         m(94.0, r50, 6.95, 93.8, 0.9095, runtime="onnxruntime"), []),
        ("student", "distill.kd", m(44.8, r18, 6.20, 91.0, 0.9079), []),
        ("pruned", "prune.channel", m(28.5, pruned, 6.72, 69.2, 0.2319), []),
        ("finetune", "finetune", m(28.5, pruned, 6.83, 70.9, 0.9027), []),
        ("int8", "quant.ptq", m(7.2, pruned, 0.48, 24.9, 0.9015, "int8", "onnxruntime"), []),
    ]
    record = make_record()
    record.name = "quickstart"
    record.recipe = {
        "name": "quickstart", "model": {"arch": "resnet50"},
        "stages": [{"kind": kind, "name": name} for name, kind, *_ in stages[1:]],
        "report": {"baseline": "teacher", "accuracy_budget": 1.0},
    }
    record.stages = [
        StageRecord(index=i, name=name, kind=kind, measurement=meas, notes=notes,
                    started="2025-01-02T03:04:05+00:00")
        for i, (name, kind, meas, notes) in enumerate(stages)
    ]
    return record


TEACHER_NOISE = "round medians 5458% apart > 10%"


def noisy_teacher_record() -> RunRecord:
    """``make_runtime_record`` whose teacher (the reference) was timed while another job
    ran: its batch-1 latency marked noisy, its rounds' medians 5,458% apart (the issue's
    teacher-onnx timing); its batch-64 timing steady."""
    record = make_runtime_record()
    teacher = next(s for s in record.stages if s.name == "teacher")
    m = teacher.measurement
    teacher.measurement = m.model_copy(update={"latency": m.latency.model_copy(update={
        "rounds": 3, "round_spread": 54.58, "noisy": True, "noise": TEACHER_NOISE})})
    return record


def write_run(run_dir: Path, record: RunRecord) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(record.model_dump_json(indent=2), encoding="utf-8")
    return run_dir


def compared(reference: str = "baseline") -> str:
    """The heading of the comparison table of a report whose reference is ``reference``."""
    return f"Stages compared with the reference ({reference})"


def table_rows(markdown: str, heading: str, stop: str = "## ") -> dict[str, dict[str, str]]:
    """Parse the Markdown table under ``## heading`` into {first cell: {header: cell}}.

    Rows are read up to the next line starting with ``stop``.
    """
    lines = markdown.splitlines()
    start = lines.index(heading if heading.startswith("#") else f"## {heading}")
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith(stop):
            break
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.append([re.sub(r"\\(.)", r"\1", c) for c in cells])
    header, _align, *body = rows
    return {row[0]: dict(zip(header, row, strict=True)) for row in body}




def subtable_rows(markdown: str, title: str) -> dict[str, dict[str, str]]:
    """The rows of the table under ``### title`` (up to the next heading of any level)."""
    return table_rows(markdown, f"### {title}", stop="#")


# The conv/linear weights of the tiny "models" of make_pruning_run: 72 + 576 + 80 = 728
# (the 1-d batch-norm weight is not one of them).
CONV_LINEAR_WEIGHTS = 728


def _tensors(width: int, zero_every_other: bool = False) -> dict:
    import torch

    gen = torch.Generator().manual_seed(width)
    shapes = {
        "conv1.weight": (width, 1, 3, 3),
        "bn1.weight": (width,),
        "layer1.0.conv1.weight": (width, width, 3, 3),
        "fc.weight": (10, width),
    }
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(*shape, generator=gen)
        t[t == 0] = 0.1  # only the pruning below makes exact zeros
        if zero_every_other and t.dim() > 1:
            t.view(-1)[::2] = 0
        out[name] = t
    return out


def _json(path: Path, payload: object) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload), encoding="utf-8")


def make_pruning_run(run_dir: Path) -> RunRecord:
    """A run folder as the pruning stages leave it: model files and per-layer JSON.

    Stages: baseline, sensitivity scan, search (answer 0.5), channel pruning and magnitude
    pruning at 0.5 (both from the baseline; the last torch model: half its conv/linear
    weights are zero), INT8.
    """
    from safetensors.torch import save_file

    stages = [
        ("baseline", "baseline", 10_000_000, 10_000_000, 0.9512),
        ("sensitivity", "prune.sensitivity", 10_000_000, 10_000_000, 0.9512),
        ("search", "prune.search", 10_000_000, 4_000_000, 0.9450),
        ("channels", "prune.channel", 2_500_000, 2_500_000, 0.9300),
        ("magnitude", "prune.magnitude", 10_000_000, 5_000_000, 0.9480),
        ("int8", "quant.ptq", 10_000_000, 5_000_000, 0.9470),
    ]
    records = []
    for i, (name, kind, params, nonzero, top1) in enumerate(stages):
        folder = run_dir / "stages" / f"{i:02d}-{name}"
        folder.mkdir(parents=True)
        artifact = f"stages/{i:02d}-{name}/model.safetensors"
        if kind == "quant.ptq":
            artifact = f"stages/{i:02d}-{name}/model.onnx"
            (run_dir / artifact).write_bytes(b"onnx")
        else:
            tensors = _tensors(4 if kind == "prune.channel" else 8,
                               zero_every_other=kind == "prune.magnitude")
            save_file(tensors, str(run_dir / artifact))
        m = _measurement(40.0 * params / 10_000_000, params, nonzero, 20.0, top1)
        records.append(StageRecord(index=i, name=name, kind=kind, artifact=artifact,
                                   measurement=m, started="2025-01-02T03:04:05+00:00"))
    _json(run_dir / "stages/01-sensitivity/sensitivity.json", {
        "method": "magnitude", "ratio": 0.9, "split": "val", "max_images": 100,
        "baseline_top1": 0.95,
        "rows": [
            {"layer": "(unpruned)", "kind": "baseline", "top1": 0.95, "drop": 0.0},
            {"layer": "conv1", "kind": "layer", "top1": 0.55, "drop": 0.40},
            {"layer": "layer1.0.conv1", "kind": "layer", "top1": 0.94, "drop": 0.01},
            {"layer": "fc", "kind": "layer", "top1": 0.952, "drop": -0.002},
        ],
    })
    _json(run_dir / "stages/02-search/search.json", {
        "method": "magnitude", "scope": "global", "tolerance_points": 1.0, "split": "val",
        "baseline_top1": 0.95, "ratio": 0.5, "top1": 0.945,
        "probes": [{"ratio": 0.99, "top1": 0.1, "kept": False},
                   {"ratio": 0.5, "top1": 0.945, "kept": True},
                   {"ratio": 0.75, "top1": 0.9, "kept": False}],
    })
    sparsity = [{"layer": "conv1", "weights": 72, "zeros": 36, "sparsity": 0.5},
                {"layer": "layer1.0.conv1", "weights": 576, "zeros": 288, "sparsity": 0.5},
                {"layer": "fc", "weights": 80, "zeros": 40, "sparsity": 0.5},
                {"layer": "(all conv/linear)", "weights": 728, "zeros": 364, "sparsity": 0.5}]
    _json(run_dir / "stages/04-magnitude/sparsity.json", sparsity)
    _json(run_dir / "stages/03-channels/channels.json", [
        {"name": "conv1", "type": "conv", "in_before": 1, "in_after": 1, "out_before": 8,
         "out_after": 4, "params_before": 72, "params_after": 36},
        {"name": "layer1.0.conv1", "type": "conv", "in_before": 8, "in_after": 4,
         "out_before": 8, "out_after": 4, "params_before": 576, "params_after": 144},
        {"name": "fc", "type": "linear", "in_before": 8, "in_after": 4, "out_before": 10,
         "out_after": 10, "params_before": 90, "params_after": 50},
    ])
    record = make_record(budget=1.0)
    record.name = "pruning"
    # the two methods side by side, each from the baseline (``from:``), as a recipe
    # comparing them would; the rest chain
    record.recipe["stages"] = [
        {"kind": kind, "name": name} | ({"from": "baseline"} if name in ("channels",
                                                                        "magnitude") else {})
        for name, kind, *_ in stages[1:]]
    record.stages = records
    write_run(run_dir, record)
    return record
