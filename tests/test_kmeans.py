"""k-means weight sharing: at most 2**bits values per layer, zeros kept exactly, a better
fit than the linear start, centroid fine-tuning that keeps the codebook, clear errors."""

from __future__ import annotations

import time

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from netshrink.data import DataConfig, build_data
from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model
from netshrink.models.select import prunable_layers
from netshrink.quant.kmeans import CodebookHook, KMeansConfig, kmeans_share, share_layer
from netshrink.train.config import TrainConfig
from netshrink.train.loop import train

SPEC = ModelSpec(arch="resnet_tiny", num_classes=10, in_channels=1, stem="cifar")


def pruned_model(ratio: float = 0.5, seed: int = 0) -> nn.Module:
    """resnet_tiny with ``ratio`` of every conv/linear weight (the smallest) set to zero,
    half of them to -0.0 the way ``mul_`` by a mask leaves negative weights."""
    torch.manual_seed(seed)
    model = build_model(SPEC)
    with torch.no_grad():
        for layer in prunable_layers(model).values():
            w = layer.weight
            k = int(ratio * w.numel())
            if k:
                threshold = w.abs().flatten().kthvalue(k).values
                w.mul_(w.abs() > threshold)
    return model


def zero_positions(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.weight.detach() == 0 for name, layer in prunable_layers(model).items()}


def distinct_nonzero(weight: torch.Tensor) -> int:
    return len(torch.unique(weight[weight != 0]))


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_each_layer_keeps_at_most_2_pow_bits_values_and_its_zeros(bits: int) -> None:
    model = pruned_model()
    zeros = zero_positions(model)
    books = kmeans_share(model, bits=bits)
    assert set(books) == set(zeros)
    for name, layer in prunable_layers(model).items():
        w = layer.weight.detach()
        assert torch.equal(w == 0, zeros[name]), name
        assert distinct_nonzero(w) <= 2**bits, name
        book = books[name]
        assert torch.equal(book.dense(), w)  # the codebook is the weight, exactly
        assert book.indices.dtype == torch.uint8 and book.indices.shape == w.shape
        assert torch.equal(book.mask, ~zeros[name])
        assert not bool((book.centroids == 0).any())
        assert len(book.centroids) <= 2**bits and book.bits <= bits


def test_kmeans_beats_its_linear_start() -> None:
    model = pruned_model()
    before = {name: layer.weight.detach().clone() for name, layer in prunable_layers(model).items()}
    kmeans_share(model, bits=3)
    for name, layer in prunable_layers(model).items():
        live = before[name][before[name] != 0]
        linear = torch.linspace(float(live.min()), float(live.max()), 8)
        nearest = linear[(live[:, None] - linear[None, :]).abs().argmin(1)]
        linear_error = float(((live - nearest) ** 2).sum())
        kmeans_error = float(((layer.weight.detach() - before[name]) ** 2).sum())
        assert kmeans_error < 0.8 * linear_error, (name, kmeans_error, linear_error)


def test_few_distinct_values_are_kept_exactly_and_sharing_is_idempotent() -> None:
    layer = nn.Linear(50, 20)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]).repeat(250).reshape(20, 50))
    original = layer.weight.detach().clone()
    book = share_layer(layer.weight, bits=2)
    assert torch.equal(layer.weight, original)
    assert book.centroids.tolist() == [-1.0, 0.5, 2.0]
    model = pruned_model()
    kmeans_share(model, bits=4)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    kmeans_share(model, bits=4)
    assert all(torch.equal(once[k], v) for k, v in model.state_dict().items())


def test_a_centroid_that_would_be_zero_is_moved_off_zero() -> None:
    # -1 and 1 share a cluster whose mean is exactly 0.0: it must not create new zeros.
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-1.0, 1.0, 10.0]]))
    book = share_layer(layer.weight, bits=1)
    assert bool((layer.weight != 0).all())
    assert len(torch.unique(layer.weight)) == 2
    assert torch.equal(book.dense(), layer.weight.detach())


def test_half_precision_weights() -> None:
    layer = nn.Linear(64, 32).half()
    with torch.no_grad():
        layer.weight[:, ::2] = 0
    zeros = layer.weight.detach() == 0
    book = share_layer(layer.weight, bits=4)
    assert layer.weight.dtype == torch.float16
    assert torch.equal(layer.weight == 0, zeros)
    assert distinct_nonzero(layer.weight.detach()) <= 16
    assert torch.equal(book.dense(torch.float16), layer.weight.detach())


def test_include_and_exclude_choose_layers() -> None:
    model = pruned_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    books = kmeans_share(model, bits=2, include=["layer*"], exclude=["*.downsample.*"])
    assert "fc" not in books and "conv1" not in books and "layer2.0.downsample.0" not in books
    assert "layer1.0.conv1" in books
    assert torch.equal(model.fc.weight, before["fc.weight"])
    assert distinct_nonzero(model.layer1[0].conv1.weight.detach()) <= 4


def test_errors_name_the_problem() -> None:
    with pytest.raises(UserError, match="1 to 8"):
        kmeans_share(pruned_model(), bits=9)
    with pytest.raises(UserError, match="1 to 8"):
        kmeans_share(pruned_model(), bits=0)
    with pytest.raises(UserError, match="'nope' matches no"):
        kmeans_share(pruned_model(), bits=4, include=["nope"])
    with pytest.raises(UserError, match="leave no layer"):
        kmeans_share(pruned_model(), bits=4, include=["fc"], exclude=["fc"])
    with pytest.raises(UserError, match="no Conv2d or Linear"):
        kmeans_share(nn.Sequential(nn.ReLU()), bits=4)


def test_config_validates() -> None:
    cfg = KMeansConfig()
    assert (cfg.bits, cfg.include, cfg.exclude, cfg.finetune_epochs, cfg.max_iter) == (
        8, [], [], 0, 50)
    for bad in (0, 9):
        with pytest.raises(ValidationError, match="1 to 8"):
            KMeansConfig(bits=bad)
    with pytest.raises(ValidationError):
        KMeansConfig(bits=4, finetune_epochs=-1)
    with pytest.raises(ValidationError):
        KMeansConfig(bitz=4)


def test_codebook_hook_keeps_the_codebook_after_an_sgd_step() -> None:
    model = pruned_model()
    books = kmeans_share(model, bits=3)
    zeros = zero_positions(model)
    old = {name: book.centroids.clone() for name, book in books.items()}
    shared = {name: layer.weight.detach().clone() for name, layer in prunable_layers(model).items()}
    lr = 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    loss = nn.functional.cross_entropy(model(torch.randn(8, 1, 16, 16)),
                                       torch.randint(0, 10, (8,)))
    loss.backward()
    grads = {name: layer.weight.grad.clone() for name, layer in prunable_layers(model).items()}
    optimizer.step()
    CodebookHook(books)(model)
    moved = 0
    for name, layer in prunable_layers(model).items():
        w = layer.weight.detach()
        book = books[name]
        assert torch.equal(w == 0, zeros[name]), name
        assert distinct_nonzero(w) <= 8, name
        assert torch.equal(book.dense(), w), name  # the stored centroids were updated
        # Plain SGD: each centroid moves by -lr times its members' mean gradient.
        ids = book.indices[book.mask].long()
        mean_grad = torch.zeros(len(old[name]), dtype=torch.float64).index_add_(
            0, ids, grads[name][book.mask].double()) / torch.bincount(ids).double()
        torch.testing.assert_close(book.centroids.double(), old[name].double() - lr * mean_grad,
                                   rtol=0, atol=1e-6)
        moved += int(not torch.equal(w, shared[name]))
    assert moved == len(books)


def test_codebook_hook_in_the_training_loop(fashion_dir) -> None:
    data = build_data(DataConfig(root=fashion_dir, val_size=0, calib_size=32))
    model = build_model(SPEC.model_copy(update={"stem": "imagenet"}))
    with torch.no_grad():
        for layer in prunable_layers(model).values():
            layer.weight[..., ::2] = 0
    books = kmeans_share(model, bits=2)
    zeros = zero_positions(model)
    cfg = TrainConfig(epochs=1, batch_size=64, max_steps=3, optimizer="adamw", lr=0.01)
    train(model, data, cfg, step_hooks=[CodebookHook(books)], log=lambda _: None)
    for name, layer in prunable_layers(model).items():
        w = layer.weight.detach()
        assert torch.equal(w == 0, zeros[name]) and distinct_nonzero(w) <= 4, name
        assert torch.equal(books[name].dense(), w), name


@pytest.mark.slow
def test_resnet50_shares_in_seconds() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="resnet50", num_classes=1000))
    start = time.perf_counter()
    kmeans_share(model, bits=8)
    assert time.perf_counter() - start < 30
    assert all(distinct_nonzero(layer.weight.detach()) <= 256
               for layer in prunable_layers(model).values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sharing_and_the_hook_on_cuda() -> None:
    model = pruned_model().cuda().to(memory_format=torch.channels_last)
    zeros = zero_positions(model)
    books = kmeans_share(model, bits=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 1, 16, 16, device="cuda")).sum().backward()
    optimizer.step()
    CodebookHook(books)(model)
    for name, layer in prunable_layers(model).items():
        w = layer.weight.detach()
        assert w.device.type == "cuda" and torch.equal(w == 0, zeros[name]), name
        assert torch.equal(books[name].dense().cuda(), w), name
