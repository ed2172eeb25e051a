"""The Python front door: every verb takes any nn.Module and plain data (a DataLoader, an
iterable of tensors or of (images, labels) batches), returns one kind of result, and what
it saves loads back with the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import netshrink
from custom_models import make_tiny
from netshrink.data.idx import read_fashion_mnist
from netshrink.errors import UserError


@pytest.fixture(scope="module")
def loaders(fashion_dir: Path) -> tuple[DataLoader, DataLoader]:
    raw = read_fashion_mnist(fashion_dir)

    def loader(images: torch.Tensor, labels: torch.Tensor, shuffle: bool) -> DataLoader:
        x = (images.float() / 255 - 0.286) / 0.353
        return DataLoader(TensorDataset(x, labels), batch_size=50, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(0))

    return (loader(raw.train_images, raw.train_labels, True),
            loader(raw.test_images, raw.test_labels, False))


@pytest.fixture(scope="module")
def trained(loaders: tuple[DataLoader, DataLoader]) -> netshrink.Compressed:
    torch.manual_seed(0)
    return netshrink.finetune(make_tiny(), loaders[0],
                              netshrink.TrainConfig(epochs=8, lr=0.1, warmup_epochs=0))


def test_a_dataloader_trains_and_evaluates(trained, loaders) -> None:
    acc = trained.evaluate(loaders[1])
    assert acc.images == 200 and acc.top1 > 0.5  # it learned: 10 classes, chance 0.1
    assert "epoch 8" in trained.notes[-1]


def test_plain_iterables_are_data_too(trained) -> None:
    images = torch.randn(8, 1, 28, 28)
    labelled = [(images[:4], torch.zeros(4, dtype=torch.long)),
                (images[4:], torch.ones(4, dtype=torch.long))]
    assert trained.evaluate(labelled).images == 8
    int8 = netshrink.quantize(trained, netshrink.PTQConfig(), calibration=[images])
    assert int8.runtime == "onnxruntime" and int8(images).shape == (8, 10)


def test_bad_batches_say_what_is_expected(trained) -> None:
    with pytest.raises(UserError, match="image tensor"):
        trained.evaluate([1, 2, 3])
    with pytest.raises(UserError, match="float tensor"):
        trained.evaluate([torch.zeros(2, 28, 28, dtype=torch.uint8)])
    with pytest.raises(UserError, match="prune takes"):
        netshrink.prune(trained, netshrink.PTQConfig())


def test_magnitude_and_nm_pruning_of_a_custom_model(trained) -> None:
    pruned = netshrink.prune(trained, netshrink.MagnitudePruneConfig(ratio=0.5))
    conv = pruned.model.conv2.weight
    assert int((conv == 0).sum()) == round(0.5 * conv.numel())  # exact, per layer
    assert trained.model.conv2.weight.count_nonzero() == conv.numel()  # input untouched
    sparse = netshrink.prune(trained, netshrink.NMPruneConfig())
    groups = sparse.model.conv2.weight.permute(0, 2, 3, 1).reshape(-1, 4)
    assert bool(((groups != 0).sum(1) <= 2).all())


def test_channel_pruning_protects_a_head_of_any_name(trained, loaders) -> None:
    # Unrounded: the tiny widths here are below the multiple of 8 round_to: auto keeps.
    pruned = netshrink.prune(trained, netshrink.ChannelPruneConfig(ratio=0.5, round_to=None),
                             data=loaders[0])
    assert pruned.model.head.out_features == 10 and pruned.model.conv1.out_channels == 4
    assert pruned.input_shape == [1, 28, 28]
    assert pruned(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_int8_zeros_and_outputs_follow_the_float_model(trained, loaders, tmp_path) -> None:
    int8 = netshrink.quantize(trained, netshrink.PTQConfig(), calibration=loaders[0],
                              out=tmp_path / "q")
    x = next(iter(loaders[1]))[0]
    want, got = trained(x), int8(x)
    snr = 10 * torch.log10(want.pow(2).mean() / (want - got).pow(2).mean())
    assert snr > 15  # dB: INT8 follows the float logits
    assert int8.evaluate(loaders[1]).top1 >= trained.evaluate(loaders[1]).top1 - 0.05
    m = int8.measure(loaders[1], options=netshrink.MeasureOptions(
        warmup=1, latency_runs=3, throughput_warmup=1, throughput_runs=2, min_seconds=None))
    assert m.runtime == "onnxruntime" and m.precision == "int8"
    assert m.size_bytes == (tmp_path / "q" / "model.onnx").stat().st_size
    assert m.params == sum(p.numel() for p in trained.model.parameters())


def test_a_custom_model_is_saved_with_its_factory_or_refused(trained, tmp_path) -> None:
    with pytest.raises(UserError, match="factory="):
        trained.save(tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()  # refused at save time, nothing written
    path = trained.save(tmp_path / "m.safetensors", factory="custom_models:make_tiny")
    with pytest.raises(UserError, match="trust"):
        netshrink.load(path)  # never runs an import the caller did not name
    again = netshrink.load(path, trust=["custom_models:make_tiny"])
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(again(x), trained(x))


def test_a_channel_pruned_custom_model_reloads(trained, loaders, tmp_path) -> None:
    # Unrounded: the tiny widths here are below the multiple of 8 round_to: auto keeps.
    pruned = netshrink.prune(trained, netshrink.ChannelPruneConfig(ratio=0.5, round_to=None),
                             data=loaders[0])
    path = pruned.save(tmp_path / "p.safetensors", factory="custom_models:make_tiny")
    again = netshrink.load(path, trust=["custom_models:make_tiny"])
    x = torch.randn(3, 1, 28, 28)
    assert again.model.conv1.out_channels == 4 and torch.equal(again(x), pruned(x))


def test_netshrink_models_keep_their_spec_through_the_verbs(tmp_path) -> None:
    model = netshrink.build_model(netshrink.ModelSpec(arch="resnet_tiny", num_classes=10,
                                                      in_channels=1, stem="cifar"))
    pruned = netshrink.prune(model, netshrink.ChannelPruneConfig(ratio=0.5),
                             example_input=torch.zeros(1, 1, 28, 28))
    assert pruned.spec is not None and pruned.spec.pruned
    shared = netshrink.quantize(pruned, netshrink.KMeansConfig(bits=4),
                                example_input=torch.zeros(1, 1, 28, 28))
    packed = shared.save(tmp_path / "m.nspk")
    again = netshrink.load(packed)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(again(x), shared(x))
    assert again.model.conv1.weight.unique().numel() <= 2 ** 4 + 1  # 16 values and zero


def test_export_and_measure_a_file(trained, tmp_path) -> None:
    onnx = netshrink.export(trained, tmp_path / "m.onnx", example_input=torch.zeros(1, 1, 28, 28))
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(onnx(x), trained(x), atol=1e-4)
    m = netshrink.measure(tmp_path / "m.onnx", options=netshrink.MeasureOptions(
        latency=False, memory=False), example_input=torch.zeros(1, 1, 28, 28))
    assert m.runtime == "onnxruntime" and m.size_bytes == (tmp_path / "m.onnx").stat().st_size


def test_distill_trains_a_copy_of_the_student(trained, loaders) -> None:
    student = make_tiny(4)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    out = netshrink.distill(student, trained, loaders[0],
                            netshrink.DistillConfig(epochs=1, lr=0.05, alpha=0.5))
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(out.model.conv1.weight, student.conv1.weight)
    assert "distilled (alpha 0.5, T 4.0)" in out.notes[-1]
