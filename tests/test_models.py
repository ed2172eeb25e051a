"""ResNets: torchvision's names and shapes, strict loading of torchvision-format files,
and outputs equal to an independent functional forward written from the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from netshrink.errors import UserError
from netshrink.models import MODELS, ModelSpec, build_model
from netshrink.store.checkpoint import guess_spec, load_model

# Parameter counts of torchvision's ResNets at 1000 classes (its documentation's figures).
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
}


def reference_forward(
    state: dict[str, torch.Tensor], x: torch.Tensor, *, stem: str
) -> torch.Tensor:
    """ResNet inference written from torchvision's architecture with functional ops only,
    reading the state dict by torchvision's key names: a check independent of our modules."""

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, state[f"{p}.running_mean"], state[f"{p}.running_var"],
                            state[f"{p}.weight"], state[f"{p}.bias"], False, 0.0, 1e-5)

    def conv(t: torch.Tensor, p: str, stride: int = 1) -> torch.Tensor:
        w = state[f"{p}.weight"]
        return F.conv2d(t, w, stride=stride, padding=w.shape[-1] // 2)

    if stem == "imagenet":
        x = F.max_pool2d(F.relu(bn(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), "bn1")),
                         3, 2, 1)
    else:
        x = F.relu(bn(conv(x, "conv1"), "bn1"))
    for stage in range(1, 5):
        blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")})
        for b in blocks:
            p = f"layer{stage}.{b}"
            stride = 2 if (stage > 1 and b == 0) else 1
            if f"{p}.downsample.0.weight" in state:
                identity = bn(conv(x, f"{p}.downsample.0", stride), f"{p}.downsample.1")
            else:
                identity = x
            if f"{p}.conv3.weight" in state:  # bottleneck, stride on the 3x3 (v1.5)
                out = F.relu(bn(conv(x, f"{p}.conv1"), f"{p}.bn1"))
                out = F.relu(bn(conv(out, f"{p}.conv2", stride), f"{p}.bn2"))
                out = bn(conv(out, f"{p}.conv3"), f"{p}.bn3")
            else:
                out = F.relu(bn(conv(x, f"{p}.conv1", stride), f"{p}.bn1"))
                out = bn(conv(out, f"{p}.conv2"), f"{p}.bn2")
            x = F.relu(out + identity)
    x = x.mean(dim=(2, 3))
    return F.linear(x, state["fc.weight"], state["fc.bias"])


def randomized_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict with every parameter and BN statistic random (not the init values)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = v.clone()
        elif k.endswith("running_var"):
            state[k] = torch.rand(v.shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(v.shape, generator=g) * (0.1 if v.ndim > 1 else 0.5)
    return state


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMS))
def test_param_counts_match_torchvision(arch: str) -> None:
    model = build_model(ModelSpec(arch=arch))
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[arch]


def test_torchvision_key_names_resnet18() -> None:
    keys = list(build_model(ModelSpec(arch="resnet18")).state_dict())
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                        "bn1.running_var", "bn1.num_batches_tracked"]
    assert "layer2.0.downsample.0.weight" in keys and "layer2.0.downsample.1.running_var" in keys
    assert keys[-2:] == ["fc.weight", "fc.bias"]
    assert len(keys) == 122  # torchvision's resnet18 state dict has 122 entries


@pytest.mark.parametrize(
    "arch,stem,size",
    [("resnet18", "imagenet", 64), ("resnet50", "imagenet", 64), ("resnet18", "cifar", 32),
     ("resnet_tiny", "cifar", 16)],
)
def test_pth_file_loads_strictly_and_matches_reference(tmp_path, arch, stem, size) -> None:
    model = build_model(ModelSpec(arch=arch, stem=stem, num_classes=17))
    state = randomized_state(model, seed=1)
    path = tmp_path / f"{arch}.pth"
    torch.save(state, path)  # torchvision's checkpoint files are exactly this: a dict of tensors
    loaded, spec, _ = load_model(path)
    assert (spec.arch, spec.stem, spec.num_classes) == (arch, stem, 17)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = loaded(x)
    expected = reference_forward(state, x, stem=stem)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_cifar_stem_grayscale_shapes() -> None:
    model = build_model(ModelSpec(arch="resnet18", stem="cifar", num_classes=10, in_channels=1))
    assert model.conv1.weight.shape == (64, 1, 3, 3)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_model_lists_known() -> None:
    with pytest.raises(UserError, match=r"unknown model 'resnet19'.*resnet18.*resnet50"):
        build_model(ModelSpec(arch="resnet19"))
    assert {"resnet18", "resnet34", "resnet50", "resnet101"} <= set(MODELS.names())


def test_guess_spec_rejects_non_resnet() -> None:
    with pytest.raises(UserError, match="not a ResNet"):
        guess_spec({"weight": torch.zeros(3)})


@pytest.mark.parametrize(
    "cin,cout,k,stride,pad,size",
    [(8, 6, 3, 1, 1, 1), (8, 6, 3, 2, 1, 2), (8, 6, 1, 2, 0, 2), (8, 6, 3, 2, 1, 1),
     (3, 4, 7, 2, 3, 2), (8, 6, 3, 1, 1, 3)],  # the last one has a 3x3 output: plain conv
)
def test_conv_with_one_pixel_output_matches_plain_conv_and_gradients(
    cin: int, cout: int, k: int, stride: int, pad: int, size: int
) -> None:
    from netshrink.models.resnet import Conv2d

    torch.manual_seed(0)
    ours = Conv2d(cin, cout, k, stride=stride, padding=pad, bias=True).train()
    plain = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=True)
    plain.load_state_dict(ours.state_dict())
    x1 = torch.randn(5, cin, size, size, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = ours(x1), plain(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-5)
