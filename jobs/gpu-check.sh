#!/usr/bin/env bash
# The GPU check, as one command on a machine with a CUDA GPU, from the repository's root:
#
#   OUT=/some/dir bash jobs/gpu-check.sh
#
# Needs a python3 with a CUDA torch, pandas, seaborn, scipy, tqdm and pytest (an existing environment,
# e.g. a cluster's module or a GPU node image; HPCNOISE_PYTHON picks another interpreter). Horovod is
# optional: without it every check runs in one process (W = 1), and the "horovod" rows of the step
# benchmark are the same loop without Horovod. Writes, to $OUT (default /tmp/hpcnoise-gpu-check):
#   gpu.txt         the device, torch and CUDA versions, and whether Horovod has NCCL
#   tests.txt       the GPU tests (tests/test_gpu.py: GPU against CPU in float64, CUDA-event timing)
#                   and the step's own tests (tests/test_step.py, tests/test_buckets.py) on this machine
#   bench_step.txt  hpcnoise bench step on the GPU (the table, the targets, a profile), and .csv
#   scaling.txt     hpcnoise bench scaling from the GPU's compute times, and times.json for --times
# Exit status 1 when any part failed; every part runs regardless.
set -uo pipefail

out=${OUT:-/tmp/hpcnoise-gpu-check}
py=${HPCNOISE_PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

part() {  # part NAME COMMAND...: run it, keep its output in $OUT/NAME.txt, show it, note a failure
  local name=$1
  shift
  echo "== $name: $*"
  "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  cat "$out/$name.txt"
  if [ "$rc" != 0 ]; then
    echo "== $name FAILED (exit $rc)"
    status=1
  fi
}

part gpu "$py" -c '
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.cuda.is_available(), "torch sees no CUDA GPU"
print("gpu", torch.cuda.get_device_name(0))
try:
    import horovod.torch as hvd
except ImportError as e:
    print("horovod: not importable (%s): every check runs in one process" % e)
else:
    print("horovod: nccl_built", hvd.nccl_built())
'
part tests "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_step.py tests/test_buckets.py
part bench_step "$py" -m hpcnoise.cli bench step --device cuda --models mlp,cnn1d,lenet5,resnet44 \
  --batch 512 --rounds 7 --profile 10 --csv "$out/bench_step.csv"
part scaling "$py" -m hpcnoise.cli bench scaling --device cuda --models resnet44,vgg16_bn --batch 128 \
  --write-times "$out/times.json"
exit "$status"
