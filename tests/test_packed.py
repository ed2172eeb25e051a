"""Packed model files: exact reloads of sparse, codebook and int8 weights, sizes that follow
from the encodings, ONNX models that run the same after a round trip, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zstandard
from torch import nn

from netshrink.errors import UserError
from netshrink.models import ModelSpec, build_model
from netshrink.models.select import prunable_layers
from netshrink.prune.channel import ChannelPruneConfig, prune_channels
from netshrink.quant.kmeans import kmeans_share
from netshrink.store import packed
from netshrink.store.bitpack import pack_bits, unpack_bits
from netshrink.store.checkpoint import save_model
from netshrink.store.packed import (
    MAGIC,
    dequantize_int8,
    load_packed,
    load_packed_model,
    pack_model,
    save_packed,
)
from netshrink.store.packed_onnx import pack_onnx, unpack_onnx

SPEC = ModelSpec(arch="resnet_tiny", num_classes=10, in_channels=1, stem="cifar")
X = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def pruned_model(ratio: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(SPEC).eval()
    with torch.no_grad():
        for layer in prunable_layers(model).values():
            w = layer.weight
            threshold = w.abs().flatten().kthvalue(int(ratio * w.numel())).values
            w.mul_(w.abs() > threshold)  # leaves -0.0 for negative weights, as masks do
    return model


def header(path) -> dict:
    """The JSON header of a packed file, read the way the format describes it."""
    payload = zstandard.ZstdDecompressor().decompressobj().decompress(
        path.read_bytes()[len(MAGIC):])
    size = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8 : 8 + size])


def rewrite(path, head: dict, blobs: bytes | None = None) -> None:
    """Write a packed file with a changed header (and optionally changed data)."""
    payload = zstandard.ZstdDecompressor().decompressobj().decompress(
        path.read_bytes()[len(MAGIC):])
    size = int.from_bytes(payload[:8], "little")
    body = json.dumps(head).encode()
    data = payload[8 + size :] if blobs is None else blobs
    frame = zstandard.ZstdCompressor().compress(len(body).to_bytes(8, "little") + body + data)
    path.write_bytes(MAGIC + frame)


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- bit packing


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 13, 1001])
def test_bit_packing_round_trips(bits: int, count: int) -> None:
    values = np.random.default_rng(bits * 1000 + count).integers(0, 1 << bits, count)
    data = pack_bits(values.astype(np.uint8), bits)
    assert len(data) == (count * bits + 7) // 8
    assert np.array_equal(unpack_bits(data, bits, count), values)


def test_bit_packing_layout() -> None:
    assert pack_bits(np.array([1, 2, 15, 0], dtype=np.uint8), 4) == bytes([0x21, 0x0F])
    # 3 bits: 5 = 101, 3 = 011, 7 = 111 -> stream 101 110 111 (low bits first) -> 0xDD 0x01
    assert pack_bits(np.array([5, 3, 7], dtype=np.uint8), 3) == bytes([0b11011101, 0b1])
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_bits(np.array([8], dtype=np.uint8), 3)
    with pytest.raises(ValueError, match="take 2 bytes"):
        unpack_bits(b"\x00", 3, 5)


# ------------------------------------------------------------------------------ tensors


def test_every_dtype_reloads_bit_for_bit(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    sparse = torch.randn(300, 7, generator=g) * (torch.rand(300, 7, generator=g) < 0.1)
    tensors = {
        "f32_dense": torch.randn(5, 6, generator=g),
        "f32_sparse": sparse,
        "f16": sparse.half(),
        "bf16": sparse.bfloat16(),
        "f64": sparse.double(),
        "i8": (sparse * 50).to(torch.int8),
        "u8": torch.randint(0, 255, (17,), dtype=torch.uint8, generator=g),
        "i64_scalar": torch.tensor(12345678901, dtype=torch.int64),
        "i32": torch.arange(-5, 5, dtype=torch.int32),
        "bool": torch.rand(33, generator=g) > 0.5,
        "empty": torch.zeros(0, 3),
        "special": torch.tensor([float("inf"), -float("inf"), 1e-45, -2.5, 0.0]),
    }
    path = tmp_path / "t.nspk"
    size = save_packed(path, tensors, meta={"note": "hi"})
    assert size == path.stat().st_size and path.read_bytes().startswith(MAGIC)
    loaded, meta = load_packed(path)
    assert meta == {"note": "hi"}
    assert same_state(tensors, loaded)
    nan = torch.tensor([float("nan"), 1.0])
    save_packed(path, {"nan": nan})
    assert torch.equal(load_packed(path)[0]["nan"].view(torch.int32), nan.view(torch.int32))
    encodings = {e["name"]: e["encoding"] for e in header(path)["tensors"]}
    assert encodings == {"nan": "dense"}


def test_sparse_is_chosen_when_smaller_and_negative_zero_counts_as_zero(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 100, generator=g)
    w = torch.where(torch.rand(1000, 100, generator=g) < 0.9, -0.0 * w.sign(), w)
    assert int((w.view(torch.int32) == 0).sum()) < 0.5 * w.numel()  # many are -0.0
    path = tmp_path / "s.nspk"
    size = save_packed(path, {"w": w, "d": torch.randn(10)})
    encodings = {e["name"]: e["encoding"] for e in header(path)["tensors"]}
    assert encodings == {"w": "sparse", "d": "dense"}
    # 1 bit per element + 4 bytes per non-zero, plus zstd's and the header's few bytes.
    assert size < (w.numel() / 8 + int((w != 0).sum()) * 4) * 1.02 + 1000
    loaded = load_packed(path)[0]["w"]
    assert torch.equal(loaded, w)
    assert not bool(torch.signbit(loaded[w == 0]).any())  # zeros come back as +0.0


def test_int8_weights_reload_through_dequantize(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (16, 8, 3, 3), dtype=torch.int8, generator=g)
    q[torch.rand(q.shape, generator=g) < 0.7] = 0
    scale = torch.rand(16, generator=g) / 100
    zero_point = torch.randint(-3, 3, (16,), dtype=torch.int32, generator=g)
    sym = dequantize_int8(q, scale)
    asym = dequantize_int8(q, scale, zero_point)
    assert torch.equal(sym, q.float() * scale.view(-1, 1, 1, 1))
    path = tmp_path / "q.nspk"
    save_packed(path, {"sym": sym, "asym": asym, "half": sym.half()},
                int8={"sym": (q, scale), "asym": (q, scale, zero_point),
                      "half": (q, scale)})
    assert {e["encoding"] for e in header(path)["tensors"]} == {"int8"}
    assert all("mask" in e["parts"] for e in header(path)["tensors"])  # 70% zeros: sparse
    loaded, _ = load_packed(path)
    assert same_state(loaded, {"sym": sym, "asym": asym, "half": sym.half()})
    with pytest.raises(ValueError, match="does not reproduce"):
        save_packed(path, {"w": sym + 1}, int8={"w": (q, scale)})
    with pytest.raises(ValueError, match="one per output"):
        dequantize_int8(q, torch.ones(3))


# ------------------------------------------------------------------------------- models


def test_packed_model_reloads_identically(tmp_path) -> None:
    model = pruned_model()
    path = tmp_path / "m.nspk"
    pack_model(model, SPEC, path, meta={"class_names": list("abcdefghij")})
    loaded, spec, meta = load_packed_model(path)
    assert spec == SPEC and meta["class_names"][1] == "b" and not loaded.training
    assert same_state(model.state_dict(), loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(model(X), loaded(X))


def test_channel_pruned_model_reloads(tmp_path) -> None:
    torch.manual_seed(0)
    pruned = prune_channels(build_model(SPEC).eval(), ChannelPruneConfig(ratio=0.5),
                            example_input=torch.zeros(1, 1, 16, 16)).eval()
    path = tmp_path / "c.nspk"
    pack_model(pruned, SPEC.model_copy(update={"pruned": True}), path)
    loaded, spec, _ = load_packed_model(path)
    assert spec.pruned and same_state(pruned.state_dict(), loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(pruned(X), loaded(X))


def test_sizes_follow_the_encodings(tmp_path) -> None:
    """A 50%-sparse model packs to about 1 bit + half a float per weight, a 4-bit codebook
    of it to 1 bit + 2 bits per weight: bounds computed from the model itself."""
    model = pruned_model()
    dense = save_model(model, SPEC, tmp_path / "m.safetensors", meta={})
    weights = sum(layer.weight.numel() for layer in prunable_layers(model).values())
    live = sum(int((layer.weight != 0).sum()) for layer in prunable_layers(model).values())
    others = sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
                 if not any(k == f"{name}.weight" for name in prunable_layers(model)))
    slack = 8_000  # header JSON (compressed), zstd framing

    sparse = pack_model(model, SPEC, tmp_path / "s.nspk")
    assert sparse < weights / 8 + live * 4 + others + slack
    assert sparse < 0.56 * dense  # 17 of 32 bits per weight, and less the rest

    books = kmeans_share(model, bits=4)
    shared = pack_model(model, SPEC, tmp_path / "k.nspk", codebooks=books)
    centroids = 16 * 4 * len(books)
    assert shared < weights / 8 + live * 4 / 8 + centroids + others + slack
    assert shared < 0.10 * dense  # 3 of 32 bits per weight (0.094), less with zstd
    loaded, _, _ = load_packed_model(tmp_path / "k.nspk")
    assert same_state(model.state_dict(), loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(model(X), loaded(X))
    assert {e["encoding"] for e in header(tmp_path / "k.nspk")["tensors"]
            if e["name"].endswith(".weight") and e["dtype"] == "float32"
            and len(e["shape"]) > 1} == {"codebook"}


def test_a_stale_codebook_is_refused(tmp_path) -> None:
    model = pruned_model()
    books = kmeans_share(model, bits=4)
    with torch.no_grad():
        model.fc.weight.add_(0.01)
    with pytest.raises(ValueError, match=r"'fc.weight' does not reproduce"):
        pack_model(model, SPEC, tmp_path / "k.nspk", codebooks=books)
    assert not (tmp_path / "k.nspk").exists()


# ------------------------------------------------------------------------------- errors


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "m.nspk"
    pack_model(pruned_model(), SPEC, path)
    return path


def test_missing_and_foreign_files(tmp_path, good) -> None:
    with pytest.raises(UserError, match=r"nope.nspk: packed model file not found"):
        load_packed(tmp_path / "nope.nspk")
    other = tmp_path / "m.safetensors"
    save_model(pruned_model(), SPEC, other, meta={})
    with pytest.raises(UserError, match=r"m.safetensors: not a netshrink packed file"):
        load_packed_model(other)
    newer = tmp_path / "newer.nspk"
    newer.write_bytes(b"NSPK2\n" + good.read_bytes()[len(MAGIC):])
    with pytest.raises(UserError, match=r"newer.*upgrade netshrink"):
        load_packed(newer)


@pytest.mark.parametrize("damage", ["truncate", "flip", "append", "short"])
def test_damaged_files_are_reported(good, damage: str) -> None:
    data = bytearray(good.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x10
    elif damage == "append":
        data += b"junk"
    else:
        data = data[: len(MAGIC) + 3]
    good.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"m.nspk: (corrupt|truncated) packed file.*write it"):
        load_packed_model(good)


def test_headers_that_do_not_add_up_are_reported(good) -> None:
    head = header(good)
    entry = head["tensors"][0]
    entry["shape"] = [entry["shape"][0] + 1, *entry["shape"][1:]]
    rewrite(good, head)
    with pytest.raises(UserError, match="corrupt packed file"):
        load_packed(good)
    head = header(good)
    rewrite(good, head, blobs=b"\x00" * 10)
    with pytest.raises(UserError, match=r"corrupt packed file.*outside the data"):
        load_packed(good)


def test_unknown_version_and_encoding(good) -> None:
    original = header(good)
    head = json.loads(json.dumps(original))
    head["version"] = 2
    rewrite(good, head)
    with pytest.raises(UserError, match=r"version 2.*upgrade netshrink"):
        load_packed(good)
    head = json.loads(json.dumps(original))
    head["tensors"][3]["encoding"] = "huffman"
    rewrite(good, head)
    with pytest.raises(UserError, match=r"encoding 'huffman'.*upgrade netshrink"):
        load_packed(good)


def test_file_without_spec_or_of_the_other_kind(tmp_path) -> None:
    path = tmp_path / "t.nspk"
    save_packed(path, {"w": torch.ones(3)})
    with pytest.raises(UserError, match=r"no model spec.*load_packed"):
        load_packed_model(path)
    with pytest.raises(UserError, match=r"state dict, not a packed ONNX model.*load_packed"):
        unpack_onnx(path)


# --------------------------------------------------------------------------------- ONNX


def run_onnx(model_bytes: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dynamo=False is on purpose
def test_sparse_onnx_model_runs_identically_after_a_round_trip(tmp_path) -> None:
    pytest.importorskip("onnx")
    model = pruned_model(0.6)
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(model, (X,), str(onnx_path), input_names=["x"], dynamo=False)
    path = tmp_path / "m.nspk"
    size = pack_onnx(onnx_path, path)
    assert size < 0.6 * onnx_path.stat().st_size  # 40% of the weights left, plus a mask
    restored = unpack_onnx(path)
    feeds = {"x": X.numpy()}
    for a, b in zip(run_onnx(onnx_path.read_bytes(), feeds), run_onnx(restored, feeds),
                    strict=True):
        assert np.array_equal(a, b)
    assert any(e["encoding"] == "sparse" for e in header(path)["tensors"])
    with pytest.raises(UserError, match=r"ONNX model, not a packed model state dict.*unpack_onnx"):
        load_packed(path)


def test_int8_onnx_initializers_become_bitmask_and_values(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (64, 32)).astype(np.int8)
    q[rng.random(q.shape) < 0.75] = 0
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "scale"], ["w"]),
         helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        initializer=[numpy_helper.from_array(q, "q"),
                     numpy_helper.from_array(np.array(0.02, dtype=np.float32), "scale")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    onnx_path = tmp_path / "q.onnx"
    onnx.save(proto, str(onnx_path))
    path = tmp_path / "q.nspk"
    pack_onnx(onnx_path, path)
    entries = {e["name"]: e for e in header(path)["tensors"]}
    assert entries["q"]["encoding"] == "sparse" and entries["q"]["dtype"] == "int8"
    restored = unpack_onnx(path)
    assert restored == onnx_path.read_bytes()  # no -0.0 here: byte-identical
    feeds = {"x": rng.standard_normal((2, 64)).astype(np.float32)}
    assert np.array_equal(run_onnx(onnx_path.read_bytes(), feeds)[0],
                          run_onnx(restored, feeds)[0])


def test_onnx_errors(tmp_path, good) -> None:
    with pytest.raises(UserError, match="ONNX model not found"):
        pack_onnx(tmp_path / "none.onnx", tmp_path / "x.nspk")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xff not a proto")
    with pytest.raises(UserError, match=r"bad.onnx: not a readable ONNX model"):
        pack_onnx(bad, tmp_path / "x.nspk")
    with pytest.raises(UserError, match=r"not a packed ONNX model"):
        unpack_onnx(good)
    assert packed.FORMAT == "netshrink.packed"
