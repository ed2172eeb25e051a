#!/usr/bin/env bash
# Run on the GPU machine (the `device` tool), after scripts/device_prepare.sh here, as:
#   run(command="scripts/device_gpu_checks.sh PART", carry=[".whl", ".device-data"])
# PART (one per call: a call may run 10 minutes, a session has 30 minutes of GPU):
#   tests       the gpu-marked tests, then nvidia-smi and torch's CUDA facts
#   bench A..   benchmarks/bench_gpu.py with arguments A, e.g. --models resnet18; max-autotune
#               searches kernels for minutes per shape: give it a call of its own
#               (--variants fp32 fp16-cl-max-autotune)
#   int8        benchmarks/bench_gpu_int8.py: INT8 GEMMs against fp16
#   sparse      benchmarks/bench_sparse24.py: 2:4 per layer and end to end
#   quickstart  recipes/quickstart_gpu.yaml on Fashion-MNIST, report included
#   cpu         the CPU quickstart on 2 pinned cores (taskset -c 0,1): issue 5's 15 minutes
# Everything it writes goes under $OUT (results come back from there).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?"usage: $0 tests|bench ARGS...|int8|sparse|quickstart|cpu"}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 NETSHRINK_CACHE=/tmp/netshrink-cache
ns() { python3 -m netshrink.cli "$@"; }
case "$part" in
  tests)
    nvidia-smi | tee "$OUT/nvidia-smi.txt"
    python3 -c "import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(), torch.cuda.get_device_capability(), \
torch.backends.cudnn.version(), getattr(torch.backends, 'cusparselt', None) and \
torch.backends.cusparselt.version())" | tee "$OUT/torch-cuda.txt"
    python3 -m pytest -m gpu -p no:cacheprovider -q -rs tests 2>&1 | tee "$OUT/gpu-tests.log"
    ;;
  bench)  # bench ARGS...: bench_gpu.py's own, e.g. --models resnet18 (one model a call)
    python3 benchmarks/bench_gpu.py --out "$OUT" --tag-models "${@:2}" 2>&1 \
        | tee "$OUT/bench_gpu.log"
    ;;
  int8)
    python3 benchmarks/bench_gpu_int8.py --out "$OUT" 2>&1 | tee "$OUT/bench_gpu_int8.log"
    ;;
  sparse)
    python3 benchmarks/bench_sparse24.py --out "$OUT/sparse24_gpu" 2>&1 | tee "$OUT/sparse24.log"
    ;;
  quickstart)
    # Stopped short of the call's 10 minutes so that what finished (run.json is written
    # after every stage) still gets its report.
    timeout 540 python3 -m netshrink.cli run recipes/quickstart_gpu.yaml \
        --out "$OUT/quickstart-gpu" --data-dir .device-data 2>&1 | tee "$OUT/quickstart-gpu.log"
    ns report "$OUT/quickstart-gpu"
    rm -f "$OUT"/quickstart-gpu/stages/*/*.safetensors  # big; the report and run.json stay
    ;;
  cpu)
    { time taskset -c 0,1 python3 -m netshrink.cli run recipes/quickstart.yaml \
        --out /tmp/quickstart-cpu --data-dir .device-data --device cpu; } 2>&1 \
        | tee "$OUT/quickstart-cpu.log"
    cp /tmp/quickstart-cpu/report.md /tmp/quickstart-cpu/run.json "$OUT/" 2>/dev/null
    ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
