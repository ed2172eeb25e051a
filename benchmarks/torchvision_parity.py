"""Check that torchvision's own ResNets and ours are the same network.

torchvision does not import next to the torch we pin (its compiled ops don't match), but
its model code is plain Python. This script imports torchvision from a folder with the
compiled-op registrations stubbed out, builds each torchvision ResNet, saves its state
dict to a .pth file exactly as torchvision's published checkpoints are, loads that file
into netshrink with strict=True, and compares outputs.

    pip download --no-deps torchvision -d /tmp/tv && unzip -q /tmp/tv/*.whl -d /tmp/tv/pkg
    python benchmarks/torchvision_parity.py --torchvision /tmp/tv/pkg
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

import torch


def import_torchvision(folder: Path | None):
    if folder is not None:
        sys.path.insert(0, str(folder))
    # The meta registrations need torchvision's compiled ops; the models don't.
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("stub")
    import torchvision.models

    return torchvision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torchvision", type=Path, help="folder holding the torchvision package")
    args = parser.parse_args()
    tv = import_torchvision(args.torchvision)
    from netshrink.store.checkpoint import load_model

    torch.manual_seed(0)
    print(f"torchvision {tv.__version__}, torch {torch.__version__}")
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101"):
        reference = getattr(tv.models, arch)().eval()
        # Random BN statistics so the comparison exercises them, not just the init values.
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{arch}.pth"
            torch.save(reference.state_dict(), path)
            ours, spec, _ = load_model(path)
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            want, got = reference(x), ours(x)
        diff = (want - got).abs().max().item()
        scale = want.abs().max().item()
        same = torch.allclose(want, got, rtol=1e-4, atol=1e-4 * scale)
        print(f"{arch}: loaded strict as {spec.arch}/{spec.stem}/{spec.num_classes} classes; "
              f"max |diff| {diff:.2e} (max |logit| {scale:.2e}) -> {'MATCH' if same else 'DIFFER'}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
