#!/usr/bin/env bash
# Gather what the GPU machine lacks into two git-ignored folders that a device call carries:
#   .whl/          wheels of netshrink's dependencies missing from its image (Python 3.12)
#   .device-data/  Fashion-MNIST's IDX files (the machine reaches no registry or mirror)
# Its image has torch (CUDA), onnx, onnxruntime, safetensors, matplotlib, tqdm, psutil,
# pillow, scikit-learn, pyyaml and pytest; pydantic, torch-pruning and zstandard travel.
# Then, on the device: scripts/device_gpu_checks.sh (see there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p .whl .device-data
# The versions installed here, so both machines run the same code.
pins=$($PY - <<'PYEOF'
from importlib.metadata import version
names = ["pydantic", "pydantic_core", "annotated-types", "typing-inspection", "torch-pruning",
         "zstandard", "pytest-timeout", "typing-extensions"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PYEOF
)
# shellcheck disable=SC2086
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $pins
src=/usr/share/datasets/fashion-mnist
[ -d "$src" ] || { echo "no $src: apt-get install -y dataset-fashion-mnist" >&2; exit 1; }
cp -u "$src"/*.gz .device-data/
du -sh .whl .device-data
