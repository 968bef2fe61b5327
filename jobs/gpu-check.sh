#!/usr/bin/env bash
# The GPU check: what a GPU user runs first, as one command from the repository's root.
#
#   OUT=/some/dir bash jobs/gpu-check.sh                 # on a CUDA GPU node: at most 5 minutes
#   OUT=/some/dir bash jobs/gpu-check.sh --device cpu    # its CPU part at tiny sizes (the suite runs this)
#
# Needs a python3 with torch, numpy, scipy, pandas, seaborn and pytest (an existing environment, e.g. a
# cluster's module or a GPU node image; HPCNOISE_PYTHON picks another interpreter). Horovod, tqdm and
# BackPACK are optional: the environment part says what is missing and what that skips (without
# Horovod every part runs in one process, W = 1, and the "horovod" rows of the step benchmark are the
# same loop without Horovod; without BackPACK its rows are left out). Writes, to $OUT (default
# /tmp/hpcnoise-gpu-check), and prints:
#   env.txt         the device, torch, CUDA, bf16 support, the optional packages and what is skipped
#   tests.txt       the GPU tests (tests/test_gpu.py: GPU against CPU, bf16 and channels-last on the
#                   GPU, CUDA-event timing) and the step's own tests on this machine
#   bench_step.txt  hpcnoise bench step for mlp, cnn1d, lenet5, resnet44 and vgg16_bn in float32 and
#                   bf16 (channels-last 2-D convolutions): lb against the plain loop, diag-F exact and
#                   spatial against lb, BackPACK where it applies, the breakdown, the peak memory per
#                   block of steps and the GPU targets; and bench_step.csv
#   scaling.txt     hpcnoise bench scaling fed with this GPU's measured compute times (times.json)
# Each part has a time limit (30 + 90 + 150 + 30 s), so the whole stays within 5 minutes. Exit status 1 when any part
# failed or ran out of time; every part runs regardless.
set -uo pipefail

device=cuda
while [ $# -gt 0 ]; do
  case $1 in
    --device)
      [ $# -ge 2 ] || { echo "gpu-check: --device needs a value: cuda or cpu" >&2; exit 2; }
      device=$2; shift 2 ;;
    --device=*) device=${1#--device=}; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu-check: unknown argument '$1'; valid: --device cuda|cpu" >&2; exit 2 ;;
  esac
done
case $device in
  cuda|cpu) ;;
  *) echo "gpu-check: --device must be cuda or cpu, got '$device'" >&2; exit 2 ;;
esac

out=${OUT:-/tmp/hpcnoise-gpu-check}
py=${HPCNOISE_PYTHON:-python3}
mkdir -p "$out" || { echo "gpu-check: cannot create OUT=$out" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

if [ "$device" = cuda ]; then  # the sizes of the check; --device cpu: seconds-long sizes of the same parts
  models=mlp,cnn1d,lenet5,resnet44,vgg16_bn; batch=256; steps=3; rounds=5
  scaling_models=resnet44,vgg16_bn; scaling_batch=128
  tests=(tests/test_gpu.py tests/test_step.py tests/test_buckets.py tests/test_precision.py)
else
  models=mlp,cnn1d,lenet5; batch=16; steps=1; rounds=2
  scaling_models=mlp,lenet5; scaling_batch=8
  tests=(tests/test_precision.py -k channels_last_conv)
fi

part() {  # part NAME SECONDS COMMAND...: run it with a time limit, keep its output in $OUT/NAME.txt, show it
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  cat "$out/$name.txt"
  if [ "$rc" = 124 ]; then
    echo "== $name STOPPED after its ${limit} s"
    status=1
  elif [ "$rc" != 0 ]; then
    echo "== $name FAILED (exit $rc)"
    status=1
  fi
}

part env 30 "$py" - "$device" <<'EOF'
import importlib
import platform
import sys

import torch

device = sys.argv[1]
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if device == "cuda":
    assert torch.cuda.is_available(), "torch sees no CUDA GPU (run with --device cpu for the CPU part)"
    print("gpu", torch.cuda.get_device_name(0), "| bf16 supported:", torch.cuda.is_bf16_supported())
for name in ("numpy", "scipy", "pandas", "seaborn", "pytest"):
    print(name, importlib.import_module(name).__version__)
skips = {
    "horovod": "every part runs in one process (W = 1); the step benchmark's horovod rows are the plain loop",
    "tqdm": "no progress bars (nothing in this check uses them)",
    "backpack": "the step benchmark leaves out the BackPACK rows",
}
for name, skipped in skips.items():
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        print(f"{name}: not importable ({e}): skipped: {skipped}")
        continue
    extra = ""
    if name == "horovod":
        import horovod.torch as hvd

        extra = f" (nccl built: {hvd.nccl_built()})"
    print(name, getattr(module, "__version__", "?") + extra)
EOF
part tests 90 "$py" -m pytest -q -p no:cacheprovider -m "not slow" "${tests[@]}"
formats=float32,bf16
part bench_step 150 "$py" -m hpcnoise.cli bench step --device "$device" --models "$models" --dtypes "$formats" \
  --channels-last --batch "$batch" --steps "$steps" --rounds "$rounds" --csv "$out/bench_step.csv"
part scaling 30 "$py" -m hpcnoise.cli bench scaling --device "$device" --models "$scaling_models" \
  --batch "$scaling_batch" --repeats "$rounds" --write-times "$out/times.json"
exit "$status"
