#!/usr/bin/env bash
# Installs everything hpcnoise needs into ./.venv: Open MPI (apt, when missing and root), torch and
# torchvision, Horovod 0.28.1 built with PyTorch + MPI + Gloo (and NCCL when a GPU is present), mpi4py
# and the package itself in editable mode. Idempotent: on a ready machine it finishes in seconds.
#
# Variables (all optional):
#   HPCNOISE_VENV        virtual environment to create or reuse       (default: <repo>/.venv)
#   HPCNOISE_PYTHON      interpreter that creates it                  (default: python3)
#   HPCNOISE_TORCH       pip requirement(s) for torch and torchvision (default: torch==2.14.1 torchvision==0.29.1)
#   HPCNOISE_GPU         1 = build Horovod with NCCL, 0 = CPU only     (default: 1 when nvidia-smi sees a GPU)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${HPCNOISE_VENV:-$repo/.venv}
python=${HPCNOISE_PYTHON:-python3}
torch_req=${HPCNOISE_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
horovod_req="horovod==0.28.1"
log() { printf '[install] %s\n' "$*"; }

# --- 1. Open MPI -------------------------------------------------------------------------------
if ! command -v mpirun >/dev/null 2>&1 || ! command -v mpicxx >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Open MPI with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev >/dev/null
  else
    echo "[install] error: MPI (mpirun and mpicxx) not found. Load your cluster's MPI module" \
         "(e.g. 'module load openmpi') or install Open MPI, then rerun." >&2
    exit 1
  fi
fi

# --- 2. virtual environment --------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  log "creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

# --- 3. torch + torchvision --------------------------------------------------------------------
# shellcheck disable=SC2086  # torch_req is a list of requirements
if ! "$py" - $torch_req <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
for spec in sys.argv[1:]:
    req = Requirement(spec)
    if not req.specifier.contains(version(req.name), prereleases=True):
        sys.exit(1)
import torchvision  # noqa: F401  (a torchvision that does not match torch fails here)
PY
then
  log "installing $torch_req (several minutes on a fresh machine)"
  pip install packaging
  # shellcheck disable=SC2086
  pip install $torch_req
fi

# --- 4. the package, its dependencies, mpi4py and the test tools ---------------------------------
if ! "$py" -c "import hpcnoise, mpi4py, pytest, mnist1d" 2>/dev/null; then
  log "installing hpcnoise (editable) with its dependencies"
  pip install -e "$repo[dev]"
fi

# --- 5. Horovod ---------------------------------------------------------------------------------
if "$py" -c "import horovod.torch" 2>/dev/null; then
  log "Horovod already built against this torch"
else
  log "building $horovod_req against torch (about 10 minutes on 2 cores; pip caches the wheel)"
  pip install cmake
  # Horovod 0.28.1's CMake forces -std=c++14, but current torch headers need C++17 (torch 2.1-2.13)
  # or C++20 (torch >= 2.14). A compiler wrapper rewrites the flag to what the installed torch needs.
  cxx_std=$("$py" - <<'PY'
import torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
print("c++20" if (major, minor) >= (2, 14) else "c++17")
PY
)
  export HPCNOISE_CXX_STD=$cxx_std HPCNOISE_REAL_CXX=${CXX:-g++}
  export CXX="$repo/jobs/cxx-std-wrapper.sh"
  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
  export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
  gpu=${HPCNOISE_GPU:-$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)}
  site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  torch_cuda=$("$py" -c "import torch; print(torch.version.cuda or '')")
  if [ -n "$torch_cuda" ] && [ -z "${CUDAToolkit_ROOT:-}" ]; then
    # A CUDA build of torch makes Horovod's CMake look for a CUDA toolkit (headers + cudart), and
    # its search starts from nvcc's location. Point it at the first complete one: $CUDA_HOME,
    # /usr/local/cuda, or the toolkit pieces pip installed next to torch; cudart may live in lib/
    # rather than lib64/, so a directory with a libcudart.so link goes on CMAKE_LIBRARY_PATH.
    for d in ${CUDA_HOME:+"$CUDA_HOME"} /usr/local/cuda "$site"/nvidia/cu1[0-9]; do
      cudart=$(find "$d/" -name 'libcudart.so*' 2>/dev/null | sort | head -n 1)
      if [ -f "$d/include/cuda_runtime.h" ] && [ -n "$cudart" ]; then
        export CUDAToolkit_ROOT=$d
        libdir=$(mktemp -d)
        ln -sf "$cudart" "$libdir/libcudart.so"
        export CMAKE_LIBRARY_PATH="$libdir${CMAKE_LIBRARY_PATH:+:$CMAKE_LIBRARY_PATH}"
        log "CUDA toolkit for the build: $d"
        break
      fi
    done
  fi
  if [ "$gpu" = 1 ]; then
    export HOROVOD_GPU_OPERATIONS=NCCL
    if [ -z "${HOROVOD_NCCL_HOME:-}" ] && [ -d "$site/nvidia/nccl" ]; then
      export HOROVOD_NCCL_HOME="$site/nvidia/nccl"
    fi
    log "GPU found: building Horovod with NCCL"
  fi
  pip install --no-build-isolation "$horovod_req"
fi

"$venv/bin/horovodrun" --check-build | sed -n '/Available Frameworks/,$p' | grep -E '\[X\]' | sed 's/^/[install] /'
log "ready: activate with 'source $venv/bin/activate'"
