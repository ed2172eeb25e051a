"""Tests of netshrink.bench: counts against closed forms, timing and accuracy bookkeeping,
and that measuring leaves the caller's model alone. Tiny models only: the suite runs in
seconds on 2 cores."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.functional import cross_entropy
from torch.nn.utils import prune

from netshrink.bench import (
    Latency,
    MeasureOptions,
    count_macs,
    count_params,
    environment,
    evaluate,
    measure,
    peak_memory,
    time_model,
)
from netshrink.bench import memory as memory_module
from netshrink.data.base import ArraySplit
from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model

# ---------------------------------------------------------------- counting


def _ones_mlp() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    return model


def test_count_params_exact_with_zeroed_weights() -> None:
    model = _ones_mlp()
    assert count_params(model) == (4 * 3 + 3 + 3 * 2 + 2, 23)
    with torch.no_grad():
        model[0].weight.view(-1)[:5] = 0.0
        model[2].bias[0] = 0.0
    assert count_params(model) == (23, 23 - 6)


def test_count_params_counts_shared_parameters_once() -> None:
    shared = nn.Linear(5, 5)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert count_params(model)[0] == 5 * 5 + 5


def test_count_params_ignores_buffers() -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.BatchNorm2d(4))
    # conv 4*2 + BN weight 4 + bias 4; running_mean/var/num_batches_tracked are buffers.
    assert count_params(model)[0] == 8 + 4 + 4


def test_count_params_sees_torch_prune_masks() -> None:
    model = _ones_mlp()
    prune.l1_unstructured(model[0], name="weight", amount=7)
    # The dense weight_orig is still a parameter: the total is unchanged, the nonzero
    # count is of the weight the model computes with.
    assert count_params(model) == (23, 23 - 7)


def test_macs_of_conv_equal_closed_form() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, [3, 10, 10]) == 8 * 10 * 10 * (3 * 3 * 3)
    strided = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    assert count_macs(strided, [3, 9, 9]) == 4 * 5 * 5 * (3 * 3 * 3)
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
    assert count_macs(depthwise, [8, 6, 6]) == 8 * 6 * 6 * (1 * 3 * 3)


def test_macs_of_linear_equal_closed_form() -> None:
    # Linear acts on the last dim: one row of 10 features -> 5 outputs; bias adds no MACs.
    assert count_macs(nn.Linear(10, 5), [1, 1, 10]) == 10 * 5
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    assert count_macs(model, [3, 2, 2]) == 12 * 5


def test_macs_of_resnet18_match_published_value() -> None:
    model = build_model(ModelSpec(arch="resnet18"))
    assert count_macs(model, [3, 224, 224]) == pytest.approx(1.82e9, rel=0.01)


def test_count_macs_restores_modes_and_statistics() -> None:
    model = build_model(ModelSpec(arch="resnet_tiny", num_classes=10, stem="cifar"))
    model.train()
    model.layer1.eval()  # a caller's frozen submodule must stay frozen
    stats = model.bn1.running_mean.clone()
    count_macs(model, [3, 16, 16])
    assert model.training and model.layer2.training
    assert not model.layer1.training and not model.layer1[0].bn1.training
    assert torch.equal(model.bn1.running_mean, stats)


def test_bad_input_shape_is_a_user_error() -> None:
    with pytest.raises(UserError, match="input_shape"):
        count_macs(nn.Linear(2, 2), [1, 2])


# ---------------------------------------------------------------- timing


class _CountingFn:
    def __init__(self, sleep_s: float = 0.0) -> None:
        self.calls = 0
        self.sleep_s = sleep_s
        self.threads_seen: set[int] = set()

    def __call__(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.threads_seen.add(torch.get_num_threads())
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return x * 2


def _ordered(lat: Latency) -> bool:
    return lat.min_ms <= lat.p50_ms <= lat.p90_ms <= lat.max_ms and lat.min_ms <= lat.mean_ms


def test_time_model_respects_counts_and_orders_fields() -> None:
    fn = _CountingFn()
    lat = time_model(fn, torch.zeros(4, 3), warmup=3, runs=17, min_seconds=None)
    assert (lat.runs, lat.warmup, lat.batch_size) == (17, 3, 4)
    assert fn.calls == 3 + 17
    assert _ordered(lat)
    assert lat.std_ms >= 0
    assert lat.images_per_s == pytest.approx(4 / (lat.p50_ms / 1000))


def test_time_model_extends_to_min_seconds_and_stops_at_max_runs() -> None:
    fn = _CountingFn(sleep_s=0.002)
    lat = time_model(fn, torch.zeros(1), warmup=0, runs=2, min_seconds=0.05)
    assert lat.runs > 2  # 50 ms of 2 ms calls
    assert lat.p50_ms >= 2.0
    assert _ordered(lat)
    capped = time_model(_CountingFn(), torch.zeros(1), warmup=0, runs=2, min_seconds=60,
                        max_runs=9)
    assert capped.runs == 9


def test_time_model_sets_and_restores_threads() -> None:
    before = torch.get_num_threads()
    fn = _CountingFn()
    time_model(fn, torch.zeros(1), warmup=1, runs=2, threads=1)
    assert fn.threads_seen == {1}
    assert torch.get_num_threads() == before


def test_time_model_rejects_bad_counts() -> None:
    with pytest.raises(UserError):
        time_model(_CountingFn(), torch.zeros(1), warmup=0, runs=0)
    with pytest.raises(UserError):
        time_model(_CountingFn(), torch.zeros(1), warmup=0, runs=1, threads=0)


# ---------------------------------------------------------------- memory


def _rss_mib() -> float:
    return memory_module._status_kb()["VmRSS"] / 1024


def _allocating_fn(mib: int, hold_s: float = 0.0) -> Callable[[Tensor], Tensor]:
    def fn(x: Tensor) -> Tensor:
        big = torch.ones(mib * 2**20 // 4)  # float32: 4 bytes each, all pages touched
        if hold_s:
            time.sleep(hold_s)
        return big[:1] + x

    return fn


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_sees_a_transient_allocation() -> None:
    before = _rss_mib()
    peak, kind = peak_memory(_allocating_fn(64), torch.zeros(1), calls=1)
    assert kind == "rss"
    assert peak >= before + 60


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_sampling_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_module, "reset_peak_rss", lambda: False)
    before = _rss_mib()
    peak, kind = peak_memory(_allocating_fn(64, hold_s=0.05), torch.zeros(1), calls=1)
    assert kind == "rss"
    assert peak >= before + 60


# ---------------------------------------------------------------- accuracy


class _IndexSplit:
    """Image i is a 1x1x1 tensor holding i; the label of image i is labels[i]."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(self)))
            yield idx.float().view(-1, 1, 1, 1), self.labels[idx]


class _FixedLogits(nn.Module):
    """Returns row i of a fixed table for image i: its predictions are known exactly."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the model a dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.table[x.view(-1).long()] + self.dummy


def _table_with_label_ranks(ranks: list[int], classes: int) -> tuple[Tensor, list[int]]:
    """Logits where image i's label is the ranks[i]-th best class (0 = top-1)."""
    table = torch.arange(classes, 0, -1, dtype=torch.float32).repeat(len(ranks), 1)
    return table, list(ranks)  # class c has rank c, so label = rank


def test_evaluate_top1_top5_loss_exact() -> None:
    ranks = [0, 0, 1, 4, 5, 0, 7, 2, 0, 6]  # top-1: 4/10; top-5 (rank < 5): 7/10
    table, labels = _table_with_label_ranks(ranks, classes=8)
    model = _FixedLogits(table).train()
    acc = evaluate(model, _IndexSplit(labels), batch_size=3, split_name="val")
    assert acc.split == "val" and acc.images == 10
    assert acc.top1 == pytest.approx(4 / 10)
    assert acc.top5 == pytest.approx(7 / 10)
    assert acc.loss == pytest.approx(float(cross_entropy(table, torch.tensor(labels))), rel=1e-5)
    assert model.training  # mode restored


def test_evaluate_max_images_and_few_classes() -> None:
    ranks = [0, 1, 2, 0, 1]
    table, labels = _table_with_label_ranks(ranks, classes=3)
    acc = evaluate(_FixedLogits(table), _IndexSplit(labels), batch_size=2, max_images=3)
    assert acc.images == 3
    assert acc.top1 == pytest.approx(1 / 3)
    assert acc.top5 == 1.0  # top-min(5, 3): every label is in the top 3


def test_evaluate_empty_split_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no images"):
        evaluate(_FixedLogits(torch.zeros(1, 2)), _IndexSplit([]), batch_size=4)


# ---------------------------------------------------------------- environment & measure


def test_environment_records_what_matters() -> None:
    env = environment(threads=3, seed=7)
    assert env.threads == 3 and env.seed == 7 and env.device == "cpu" and env.gpu is None
    assert 1 <= env.cores <= (os.cpu_count() or 1)
    assert f"{env.cores} cores" in env.cpu
    assert {"torch", "numpy", "netshrink"} <= set(env.versions)
    assert env.python and env.platform
    with pytest.raises(UserError):
        environment(threads=0, seed=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_environment_without_cuda_is_a_user_error() -> None:
    with pytest.raises(UserError, match="CUDA"):
        environment(device="cuda", threads=1, seed=0)


def _tiny_split(n: int = 6) -> ArraySplit:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return ArraySplit(images, labels, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_measure_leaves_model_alone_and_records_size(tmp_path: Path) -> None:
    model = build_model(ModelSpec(arch="resnet_tiny", num_classes=10, stem="cifar")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_dir = tmp_path / "run"
    file = run_dir / "model" / "weights.safetensors"
    file.parent.mkdir(parents=True)
    save_file(model.state_dict(), str(file))
    rng_state = torch.get_rng_state()

    m = measure(
        model,
        input_shape=[3, 16, 16],
        data=_tiny_split(),
        file=file,
        run_dir=run_dir,
        options=MeasureOptions(threads=1, seed=3, batch_size=4, warmup=1, latency_runs=3,
                               throughput_warmup=1, throughput_runs=2, min_seconds=None,
                               max_eval_images=5),
    )

    assert model.training and all(mod.training for mod in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)  # incl. BN running stats
    assert torch.equal(torch.get_rng_state(), rng_state)

    assert m.size_bytes == os.path.getsize(file)
    assert m.file == "model/weights.safetensors"
    assert (m.params, m.nonzero_params) == count_params(model)
    assert m.macs == count_macs(model, [3, 16, 16])
    assert m.input_shape == [3, 16, 16] and m.precision == "fp32" and m.runtime == "torch"
    assert m.latency is not None and m.latency.batch_size == 1 and m.latency.runs == 3
    assert m.throughput is not None and m.throughput.batch_size == 4
    assert m.throughput.runs == 2
    assert _ordered(m.latency) and _ordered(m.throughput)
    assert m.peak_memory_mb is not None and m.peak_memory_mb > 0 and m.memory_kind == "rss"
    assert m.accuracy is not None and m.accuracy.images == 5 and 0 <= m.accuracy.top1 <= 1
    assert m.environment.threads == 1 and m.environment.seed == 3
    # The record survives a JSON round trip (it is what run.json holds).
    assert type(m).model_validate_json(m.model_dump_json()) == m


def test_measure_without_timing_or_memory() -> None:
    m = measure(nn.Linear(4, 3), input_shape=[1, 1, 4],
                options=MeasureOptions(latency=False, memory=False))
    assert m.latency is None and m.throughput is None
    assert m.peak_memory_mb is None and m.memory_kind is None
    assert (m.params, m.nonzero_params, m.macs) == (15, 15, 12)
    assert m.file is None and m.size_bytes is None and m.accuracy is None


def test_measure_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        measure(nn.Linear(2, 2), input_shape=[1, 1, 2], file=tmp_path / "nope.pt")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_on_cuda_leaves_model_on_cpu() -> None:
    model = build_model(ModelSpec(arch="resnet_tiny", num_classes=10, stem="cifar"))
    m = measure(model, input_shape=[3, 16, 16],
                options=MeasureOptions(device="cuda", batch_size=4, warmup=1, latency_runs=3,
                                       throughput_warmup=1, throughput_runs=2,
                                       min_seconds=None))
    assert next(model.parameters()).device.type == "cpu"
    assert m.environment.gpu and m.environment.device == "cuda" and m.memory_kind == "cuda"
    assert m.latency is not None and _ordered(m.latency)


def test_a_runtime_that_hides_its_memory_records_none() -> None:
    from netshrink.runtime.base import Executable, ModelStats

    class Hidden(Executable):
        memory_visible = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :3]

    m = measure(Hidden(runtime="x", precision="fp32", stats=ModelStats(1, 1, None)),
                input_shape=[1, 2, 2],
                options=MeasureOptions(batch_size=2, warmup=1, latency_runs=2,
                                       throughput_warmup=1, throughput_runs=2,
                                       min_seconds=None))
    assert m.peak_memory_mb is None and m.memory_kind is None and m.latency is not None


def test_a_noisy_timing_is_timed_again_and_the_steadiest_kept() -> None:
    from netshrink.bench.measure import steadiest
    from netshrink.bench.timing import latency_from_times

    def timing(rounds: list[list[float]]):
        return latency_from_times(rounds, batch_size=1, warmup=0)

    load_change = timing([[1.0] * 9, [1.3] * 9, [1.0] * 9])  # medians 30% apart
    milder = timing([[1.0] * 9, [1.15] * 9, [1.0] * 9])  # 15%: still noisy, but less
    quiet = timing([[1.0] * 9, [1.02] * 9, [1.0] * 9])
    assert load_change.noisy and milder.noisy and not quiet.noisy
    made = iter([load_change, milder, quiet])
    kept = steadiest(lambda: next(made), retries=2)
    assert kept.p50_ms == quiet.p50_ms and not kept.noisy and kept.attempts == 3
    made = iter([load_change, milder, load_change])
    kept = steadiest(lambda: next(made), retries=2)  # never quiet: the mildest, still marked
    assert kept.round_spread == milder.round_spread and kept.noisy and kept.attempts == 3
    made = iter([quiet, load_change])
    assert steadiest(lambda: next(made), retries=2).attempts == 1  # a quiet one is kept
    made = iter([load_change, quiet])
    assert steadiest(lambda: next(made), retries=0).noisy  # no retries: as timed
