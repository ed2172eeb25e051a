"""Tests of 2:4 sparsity on GPU kernels (netshrink.runtime.semi_sparse, gemm_lowering).

On CPU: the conv/linear -> GEMM lowering against F.conv2d/F.linear (the same code runs the
sparse weight on a GPU), which layers are eligible, the refusals, and the report table. The
sparse kernels themselves need an NVIDIA GPU of compute capability 8.0+: those tests carry
the ``gpu`` mark and skip elsewhere.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model, randomized_model
from netshrink.models.fold import fold_batchnorm
from netshrink.prune.nm import NMPruneConfig, nm_mask, prune_nm
from netshrink.runtime.gemm_lowering import (
    ConvAsGemm,
    LinearAsGemm,
    lower_conv_weight,
    unsupported_conv,
)
from netshrink.runtime.semi_sparse import (
    LayerReport,
    check_2to4_support,
    plan_2to4,
    report_markdown,
    shape_constraints,
    sparsify_2to4,
)

# ---------------------------------------------------------------- lowering (CPU)

CONV_CASES = [
    # cin, cout, kernel, stride, padding, H, W
    (8, 16, 1, 1, 0, 7, 9),
    (8, 16, 1, 2, 0, 9, 8),
    (16, 8, 1, 2, 0, 8, 8),
    (8, 12, 3, 1, 1, 8, 8),
    (16, 8, 3, 2, 1, 9, 7),
    (4, 8, 3, 2, 0, 10, 10),
    (8, 8, 5, 1, 2, 6, 6),
    (8, 8, 1, 1, 1, 5, 5),  # a padded 1x1 goes through im2col
    (8, 8, (1, 3), (2, 1), (0, 1), 6, 7),
    (3, 8, 7, 2, 3, 15, 15),  # a ResNet stem
]


@pytest.mark.parametrize("cin,cout,k,stride,pad,h,w", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_as_gemm_matches_conv2d(cin, cout, k, stride, pad, h, w, bias, channels_last) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias).double()
    x = torch.randn(2, cin, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gemm = ConvAsGemm(conv)
    out = gemm(x)
    expected = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=pad)
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)
    cols = gemm.columns(x)
    assert cols.shape == (expected.shape[0] * expected.shape[2] * expected.shape[3],
                          gemm.weight.shape[1])


def test_conv_as_gemm_row_padding_is_sliced_off() -> None:
    # Sparse kernels want Cout in multiples of 16/32: zero rows are added and dropped.
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1).double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    gemm = ConvAsGemm(conv, row_multiple=16)
    assert gemm.weight.shape == (16, 72)
    torch.testing.assert_close(gemm(x), conv(x))


def test_conv_as_gemm_output_is_channels_last_whatever_layout_the_gemm_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Older torch's sparse F.linear returns a transposed (column-major) view of [M, Cout].
    import netshrink.runtime.gemm_lowering as lowering

    linear = F.linear
    monkeypatch.setattr(lowering.F, "linear",
                        lambda x, w, b=None: linear(x, w, b).t().contiguous().t())
    conv = nn.Conv2d(8, 12, 1).double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    out = ConvAsGemm(conv, row_multiple=16)(x)
    monkeypatch.undo()
    torch.testing.assert_close(out, conv(x))
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_conv_as_gemm_passes_the_padded_weight_through_to_matrix() -> None:
    seen = []
    conv = nn.Conv2d(8, 4, 1)
    ConvAsGemm(conv, to_matrix=lambda w: seen.append(w.shape) or w, row_multiple=16)
    assert seen == [torch.Size([16, 8])]


def test_lowered_weight_keeps_2to4_groups_contiguous_in_k() -> None:
    # prune.nm groups 4 input channels at one kernel position; in the GEMM matrix (K
    # ordered kh, kw, cin) they must be 4 consecutive columns, the sparse kernels' groups.
    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3)
    pruned = weight * nm_mask(weight, 2, 4)
    matrix = lower_conv_weight(pruned)
    assert matrix.shape == (16, 72)
    assert ((matrix.reshape(16, -1, 4) != 0).sum(-1) <= 2).all()
    # F.unfold's (cin, kh, kw) order would not be: the lowering's order matters.
    unfold_order = pruned.reshape(16, -1)
    assert not ((unfold_order.reshape(16, -1, 4) != 0).sum(-1) <= 2).all()


@pytest.mark.parametrize("kwargs,words", [
    ({"groups": 2}, "groups=2"),
    ({"dilation": 2}, "dilation"),
    ({"padding_mode": "reflect", "padding": 1}, "padding_mode"),
    ({"padding": "same"}, "same"),
])
def test_conv_as_gemm_refuses_what_is_not_one_gemm(kwargs, words) -> None:
    conv = nn.Conv2d(8, 8, 3, **kwargs)
    assert words in (unsupported_conv(conv) or "")
    with pytest.raises(UserError, match=words):
        ConvAsGemm(conv)


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16)])
def test_linear_as_gemm_matches_linear(shape) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(16, 10).double()
    x = torch.randn(*shape, dtype=torch.float64)
    gemm = LinearAsGemm(linear, row_multiple=16)
    assert gemm.weight.shape == (16, 16)
    torch.testing.assert_close(gemm(x), F.linear(x, linear.weight, linear.bias))


def test_whole_resnet_lowered_to_dense_gemms_matches() -> None:
    # Every conv and the fc of a folded ResNet replaced by its dense GEMM: same logits.
    model = fold_batchnorm(randomized_model(ModelSpec(arch="resnet_tiny", num_classes=10)))
    model = model.double()
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    expected = model(x)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Conv2d):
            model.set_submodule(name, ConvAsGemm(m))
        elif isinstance(m, nn.Linear):
            model.set_submodule(name, LinearAsGemm(m))
    assert not any(isinstance(m, nn.Conv2d) for m in model.modules())
    torch.testing.assert_close(model(x), expected)


# ---------------------------------------------------------------- eligibility (CPU)


@pytest.fixture(scope="module")
def pruned18() -> nn.Module:
    """ResNet-18 2:4-pruned everywhere but its stem (3 channels) and fc (left dense)."""
    model = randomized_model(ModelSpec(arch="resnet18", num_classes=1000))
    pruned, _, skipped = prune_nm(model, NMPruneConfig(exclude=["fc"]))
    assert skipped == ["conv1"]
    return pruned


def test_plan_marks_the_2to4_layers_of_a_pruned_resnet18(pruned18: nn.Module) -> None:
    rows = {r.name: r for r in plan_2to4(pruned18)}
    convs = [n for n, m in pruned18.named_modules() if isinstance(m, nn.Conv2d)]
    assert list(rows) == [*convs, "fc"]
    assert "3 input channels" in (rows["conv1"].reason or "")
    assert rows["conv1"].kind == "convkxk"
    assert "not 2:4 sparse" in (rows["fc"].reason or "")  # left dense by the exclude
    assert rows["fc"].kind == "linear"
    eligible = [n for n, r in rows.items() if r.reason is None]
    assert eligible == convs[1:]
    assert rows["layer2.0.downsample.0"].kind == "conv1x1"
    assert rows["layer2.0.conv1"].kind == "convkxk"


def test_plan_after_folding_and_fp16_still_sees_2to4(pruned18: nn.Module) -> None:
    # sparsify_2to4 plans on the folded, fp16 model: folding scales rows, zeros stay zero.
    folded = fold_batchnorm(pruned18).half()
    before = [r.reason is None for r in plan_2to4(pruned18)]
    assert [r.reason is None for r in plan_2to4(folded)] == before
    assert folded.layer1[0].conv1.bias is not None  # BN really folded


def test_plan_sees_a_pruned_linear() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1000))
    pruned, _, _ = prune_nm(model, NMPruneConfig())
    (row,) = plan_2to4(pruned)
    assert (row.kind, row.reason) == ("linear", None)  # 1000 rows: padded to 1008 later


def test_plan_refuses_small_k_and_grouped_convs() -> None:
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, groups=4))
    pruned, _, _ = prune_nm(model, NMPruneConfig(include=["0"]))
    rows = plan_2to4(pruned)
    assert "K=72" in (rows[0].reason or "")  # 8 * 3 * 3 is not a multiple of 16
    assert "groups=4" in (rows[1].reason or "")
    # CUTLASS wants K in multiples of 64 for fp16, and takes fp32 where cuSPARSELt does not.
    assert "multiple of 64" in (plan_2to4(pruned, backend="cutlass")[0].reason or "")
    assert torch.float32 in shape_constraints("cutlass")
    with pytest.raises(UserError, match="unknown 2:4 backend"):
        plan_2to4(pruned, backend="cusparse")


# ---------------------------------------------------------------- refusals (CPU)


def test_sparsify_without_cuda_names_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = build_model(ModelSpec(arch="resnet_tiny", num_classes=10))
    with pytest.raises(UserError, match="need CUDA") as info:
        sparsify_2to4(model, example=torch.randn(1, 3, 32, 32))
    assert "NVIDIA GPU" in str(info.value) and "compute capability 8.0" in str(info.value)


def test_sparsify_refuses_bad_dtype_and_mode() -> None:
    model = build_model(ModelSpec(arch="resnet_tiny", num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UserError, match="float16"):
        sparsify_2to4(model, example=x, dtype=torch.float64)
    with pytest.raises(UserError, match="float16"):
        check_2to4_support(torch.int8)
    with pytest.raises(UserError, match="mode"):
        sparsify_2to4(model, example=x, mode="fastest")  # type: ignore[arg-type]


# ------------------------------------------------------- orchestration (CPU, kernels faked)


def _fake_times(fns: dict, x: torch.Tensor, **_: object) -> dict[str, float]:
    # A stand-in for the CUDA-event timer: sparse wins on 1x1 convs and fc, loses on kxk.
    sparse = fns["sparse"]
    fast = sparse.kind in ("conv1x1", "linear")
    return {"orig": 1.0, "dense": 1.5, "sparse": 0.5 if fast else 2.0}


@pytest.fixture
def cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """sparsify_2to4 on CPU: no device check, the 'sparse' weight is the dense one (so the
    lowering runs F.linear on it, as on a GPU), and fixed fake timings."""
    import netshrink.runtime.semi_sparse as semi

    monkeypatch.setattr(semi, "check_2to4_support", lambda *a, **k: torch.device("cpu"))
    monkeypatch.setattr(semi, "_to_semi_structured", lambda w, backend: w)
    monkeypatch.setattr(semi, "_time_side_by_side", _fake_times)


def _dense_cpu_fp16(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    folded = fold_batchnorm(model).half().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return folded(x.half().contiguous(memory_format=torch.channels_last)).float()


@pytest.mark.usefixtures("cpu_kernels")
@pytest.mark.parametrize("mode", ["auto", "all"])
def test_sparsify_replaces_the_layers_its_mode_picks(pruned18: nn.Module, mode: str) -> None:
    x = torch.randn(2, 3, 64, 64)
    model, rows = sparsify_2to4(pruned18, example=x, mode=mode)
    by_name = {r.name: r for r in rows}
    assert not by_name["conv1"].used and by_name["conv1"].gemm is None
    assert not by_name["fc"].used  # left dense by the pruning
    timed = [r for r in rows if r.gemm is not None]
    assert len(timed) == len(rows) - 2
    if mode == "auto":
        assert {r.name for r in rows if r.used} == {
            f"layer{i}.0.downsample.0" for i in (2, 3, 4)}
        assert all(r.reason == "sparse not faster than the original layer"
                   for r in timed if r.kind == "convkxk")
    else:
        assert all(r.used and r.reason is None for r in timed)
    lowered = {n for n, m in model.named_modules() if isinstance(m, ConvAsGemm)}
    assert lowered == {r.name for r in rows if r.used}
    down = by_name["layer2.0.downsample.0"]
    assert down.gemm == (2 * 8 * 8, 64, 128)  # 64x64 input: layer2 runs at 8x8
    assert by_name["layer1.0.conv1"].gemm == (2 * 16 * 16, 9 * 64, 64)
    assert all(r.max_rel_err is not None and r.max_rel_err < 1e-2 for r in timed)
    with torch.inference_mode():
        out = model(x.half().contiguous(memory_format=torch.channels_last)).float()
    ref = _dense_cpu_fp16(pruned18, x)
    assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.usefixtures("cpu_kernels")
def test_sparsify_keeps_dense_where_the_sparse_output_differs(
    pruned18: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    import netshrink.runtime.semi_sparse as semi

    monkeypatch.setattr(semi, "_to_semi_structured", lambda w, backend: w * 1.5)
    model, rows = sparsify_2to4(pruned18, example=torch.randn(1, 3, 32, 32), mode="all")
    timed = [r for r in rows if r.gemm is not None]
    assert timed and not any(r.used for r in rows)
    assert all("differs" in (r.reason or "") for r in timed)
    assert not any(isinstance(m, ConvAsGemm | LinearAsGemm) for m in model.modules())


@pytest.mark.usefixtures("cpu_kernels")
def test_sparsify_pads_a_linear_with_1000_outputs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(64, 1000))
    pruned, _, _ = prune_nm(model, NMPruneConfig())
    x = torch.randn(4, 3, 8, 8)
    out, rows = sparsify_2to4(pruned, example=x, mode="all", alg_search=True)
    assert [(r.kind, r.used) for r in rows] == [("convkxk", False), ("linear", True)]
    assert rows[1].alg_id is None  # no cuSPARSELt weight to search for
    assert rows[1].gemm == (4, 64, 1000)
    fc = out[4]
    assert isinstance(fc, LinearAsGemm) and fc.weight.shape == (1008, 64)  # 16-row tiles
    with torch.inference_mode():
        got = out(x.half().contiguous(memory_format=torch.channels_last)).float()
    assert got.shape == (4, 1000)
    ref = _dense_cpu_fp16(pruned, x)
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()


# ---------------------------------------------------------------- report (CPU)


def test_report_markdown_from_a_hand_built_report() -> None:
    rows = [
        LayerReport("conv1", "convkxk", reason="3 input channels are not a multiple of 4"),
        LayerReport("layer1.0.conv1", "convkxk", gemm=(3136, 576, 64), cudnn_ms=0.050,
                    dense_gemm_ms=0.120, sparse_ms=0.100, used=False,
                    reason="sparse not faster than the original layer", max_rel_err=1e-3),
        LayerReport("layer4.0.conv3", "conv1x1", gemm=(3136, 512, 2048), cudnn_ms=0.200,
                    dense_gemm_ms=0.210, sparse_ms=0.160, used=True, max_rel_err=2e-3),
    ]
    text = report_markdown(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| layer | kind | GEMM M×K×N |")
    assert len({line.count("|") for line in lines[:5]}) == 1  # every row has every column
    used_row = "| layer4.0.conv3 | conv1x1 | 3136×512×2048 | 0.200 | 0.210 | 0.160 | 1.25x | yes |"
    assert used_row in text
    assert "| conv1 | convkxk |  |  |  |  |  | no | 3 input channels" in text
    assert "1 of 3 layers sparse (2 timed, 1 ineligible)" in text
    assert "0.250 ms original -> 0.210 ms chosen (1.19x)" in text
    assert rows[2].speedup == pytest.approx(1.25)
    assert rows[0].speedup is None


# ---------------------------------------------------------------- GPU (sparse kernels)

needs_sm80 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="needs an NVIDIA GPU of compute capability 8.0+ (2:4 sparse tensor cores)",
)


def _pruned(arch: str) -> nn.Module:
    model = randomized_model(ModelSpec(arch=arch, num_classes=1000))
    return prune_nm(model, NMPruneConfig())[0]


def _dense_fp16(model: nn.Module) -> nn.Module:
    folded = fold_batchnorm(model).cuda().half()
    return folded.to(memory_format=torch.channels_last).eval()


def _assert_matches_dense(model: nn.Module, sparse: nn.Module, x: torch.Tensor) -> None:
    """The sparse model's logits agree with the dense fp16 model's within 5% of their scale."""
    xh = x.cuda().half().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref, out = _dense_fp16(model)(xh).float(), sparse(xh).float()
    assert (out - ref).abs().max() <= 5e-2 * ref.abs().max()


@pytest.mark.gpu
@needs_sm80
@pytest.mark.parametrize("cin,cout,k,stride,pad,h,w", [
    (64, 64, 1, 1, 0, 14, 14), (64, 128, 1, 2, 0, 14, 14), (64, 64, 3, 1, 1, 14, 14),
    (128, 256, 3, 2, 1, 14, 14), (64, 24, 3, 1, 1, 8, 8),  # 24 rows: padded to 32
])
def test_gpu_sparse_conv_as_gemm_matches_conv(cin, cout, k, stride, pad, h, w) -> None:
    from netshrink.runtime.semi_sparse import _to_semi_structured

    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad).cuda().half()
    with torch.no_grad():
        conv.weight.mul_(nm_mask(conv.weight, 2, 4))
    x = torch.randn(8, cin, h, w, device="cuda", dtype=torch.half)
    x = x.contiguous(memory_format=torch.channels_last)
    sparse = ConvAsGemm(conv, to_matrix=lambda m: _to_semi_structured(m, backend="cusparselt"),
                        row_multiple=16)
    assert isinstance(sparse.weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.inference_mode():
        out, ref = sparse(x), conv(x)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert (out - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.gpu
@needs_sm80
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_gpu_sparsify_all_matches_dense_fp16(arch: str) -> None:
    model = _pruned(arch)
    x = torch.randn(16, 3, 224, 224)
    sparse, rows = sparsify_2to4(model, example=x, mode="all", warmup=1, iters=3, repeats=2)
    used = [r for r in rows if r.used]
    assert used, report_markdown(rows)
    assert rows[0].name == "conv1" and not rows[0].used
    assert sum(isinstance(m, ConvAsGemm) for m in sparse.modules()) == sum(
        r.kind != "linear" for r in used)
    dense = _dense_fp16(model)
    xh = x.cuda().half().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref, out = dense(xh).float(), sparse(xh).float()
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 5e-2 * ref.abs().max(), report_markdown(rows)
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


@pytest.mark.gpu
@needs_sm80
def test_gpu_sparsify_auto_uses_only_faster_layers() -> None:
    model = _pruned("resnet50")
    x = torch.randn(64, 3, 224, 224)
    sparse, rows = sparsify_2to4(model, example=x, mode="auto", warmup=2, iters=5, repeats=3)
    for r in rows:
        if r.used:
            assert r.sparse_ms is not None and r.cudnn_ms is not None
            assert r.sparse_ms < r.cudnn_ms, report_markdown(rows)
        elif r.gemm is not None:
            assert r.reason, r
    assert sum(isinstance(m, ConvAsGemm | LinearAsGemm) for m in sparse.modules()) == sum(
        r.used for r in rows)
    _assert_matches_dense(model, sparse, x)


@pytest.mark.gpu
@needs_sm80
def test_gpu_sparsify_with_cusparselt_algorithm_search() -> None:
    model = _pruned("resnet18")
    x = torch.randn(32, 3, 224, 224)
    sparse, rows = sparsify_2to4(model, example=x, mode="all", alg_search=True,
                                 warmup=1, iters=3, repeats=2)
    assert any(r.alg_id is not None for r in rows if r.used), report_markdown(rows)
    _assert_matches_dense(model, sparse, x)


@pytest.mark.gpu
@needs_sm80
def test_gpu_support_check_per_backend() -> None:
    assert check_2to4_support(torch.float16).type == "cuda"
    major = torch.cuda.get_device_capability()[0]
    if major == 8:
        assert check_2to4_support(torch.float16, backend="cutlass").type == "cuda"
    else:  # torch's CUTLASS 2:4 kernels are built for 8.x only (Hopper: cuSPARSELt)
        with pytest.raises(UserError, match=r"capability 8\.x"):
            check_2to4_support(torch.float16, backend="cutlass")
