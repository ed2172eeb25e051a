#!/usr/bin/env bash
# Set up netshrink on a fresh machine: Debian's Fashion-MNIST, then a virtual environment
# in .venv with torch installed first, pinned (an unpinned torch pulls gigabytes of CUDA
# packages; 2.13.0 is the CPU wheel these machines carry), then netshrink and its extras.
#   scripts/setup.sh          # what the quickstart needs
#   scripts/setup.sh dev      # + what the tests need (and Debian's Chromium, which
#                             #   tests/test_report_layout.py opens the reports in)
# On an NVIDIA GPU machine, take a CUDA build of torch from PyTorch's own index, e.g.
#   NETSHRINK_TORCH_INDEX=https://download.pytorch.org/whl/cu128 scripts/setup.sh
# (the GPU paths need nothing else: cuDNN, cuBLAS and cuSPARSELt come with that torch).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-}"
torch_version="${NETSHRINK_TORCH_VERSION:-2.13.0}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# The dev extra's Playwright drives the system's Chromium; it is never told to download
# a browser of its own (no `playwright install`).
if [[ ",$extras," == *",dev,"* ]] && ! command -v chromium >/dev/null; then
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq chromium >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
# The right version, and a CUDA build when a CUDA index was asked for.
want_cuda=${NETSHRINK_TORCH_INDEX:+1}
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version' or ('$want_cuda' == '1' and torch.version.cuda is None))" 2>/dev/null \
  || "${pip[@]}" install "torch==$torch_version" \
       ${NETSHRINK_TORCH_INDEX:+--index-url "$NETSHRINK_TORCH_INDEX" --force-reinstall}
if [ -n "$extras" ]; then
  "${pip[@]}" install -e ".[$extras]"
else
  "${pip[@]}" install -e .
fi
echo "netshrink is set up in .venv (torch $torch_version)"
