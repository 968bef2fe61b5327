#!/usr/bin/env bash
# Builds and installs Horovod 0.28.1 against the torch of one Python interpreter, with the PyTorch
# framework and the MPI and Gloo controllers (and NCCL for GPU operations when asked), and checks the
# result. Used by containers/Dockerfile on top of an image that already has torch (NGC PyTorch).
#
# Horovod 0.28.1's CMake forces -std=c++14 while current torch headers need C++17 (torch 2.1-2.13) or
# C++20 (torch >= 2.14): the compiler wrapper jobs/cxx-std-wrapper.sh rewrites the flag. With a CUDA
# build of torch, Horovod's CMake needs a CUDA toolkit: $CUDA_HOME, /usr/local/cuda (NGC images), or
# the toolkit pieces pip installed next to torch (site-packages/nvidia/cu1x).
#
# Variables (all optional):
#   PYTHON                  interpreter whose torch Horovod is built against     (default: python3)
#   HOROVOD_GPU_OPERATIONS  NCCL: GPU allreduce through NCCL (needs CUDA and NCCL); empty: CPU only
#                                                                                 (default: empty)
#   HOROVOD_NCCL_HOME       NCCL prefix, when Horovod's CMake does not find it  (default: torch's pip NCCL
#                           in site-packages/nvidia/nccl, if there)
#   HPCNOISE_REAL_CXX       the C++ compiler behind the wrapper                 (default: $CXX, else g++)
#   MAKEFLAGS               parallel compile jobs                                (default: -j$(nproc))
#   PIP_*                   pip's own settings, e.g. PIP_FIND_LINKS=DIR to take a Horovod wheel built
#                           earlier for this same torch from DIR instead of compiling
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-python3}
log() { printf '[build-horovod] %s\n' "$*"; }
pip() { "$py" -m pip --disable-pip-version-check "$@"; }

cxx_std=$("$py" - <<'PY'
import torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
print("c++20" if (major, minor) >= (2, 14) else "c++17")
PY
)
export HPCNOISE_CXX_STD=$cxx_std HPCNOISE_REAL_CXX=${HPCNOISE_REAL_CXX:-${CXX:-g++}}
export CXX="$here/cxx-std-wrapper.sh"
# nvcc compiles Horovod's CUDA kernels with its own -std=c++11 and hands its host compiler the same flag:
# that compiler must be the real one (CMake >= 3.27 would otherwise take $CXX, the wrapper, and the
# two halves of one compilation would disagree on the standard).
CUDAHOSTCXX=$(command -v "$HPCNOISE_REAL_CXX")
export CUDAHOSTCXX
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}

site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
torch_site=$("$py" -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
torch_cuda=$("$py" -c "import torch; print(torch.version.cuda or '')")
if [ -n "$torch_cuda" ] && [ -z "${CUDAToolkit_ROOT:-}" ]; then
  # cudart may live in lib/ rather than lib64/: a directory with a libcudart.so link goes on
  # CMAKE_LIBRARY_PATH so that CMake's FindCUDAToolkit sees it.
  for d in ${CUDA_HOME:+"$CUDA_HOME"} /usr/local/cuda "$torch_site"/nvidia/cu1[0-9] "$site"/nvidia/cu1[0-9]; do
    [ -d "$d" ] || continue
    cudart=$(find "$d/" -name 'libcudart.so*' | sort | head -n 1)
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
if [ "${HOROVOD_GPU_OPERATIONS:-}" = NCCL ]; then
  export HOROVOD_GPU_OPERATIONS
  if [ -z "${HOROVOD_NCCL_HOME:-}" ] && [ -d "$torch_site/nvidia/nccl" ]; then
    export HOROVOD_NCCL_HOME="$torch_site/nvidia/nccl"
  fi
  log "GPU operations through NCCL${HOROVOD_NCCL_HOME:+ ($HOROVOD_NCCL_HOME)}"
else
  unset HOROVOD_GPU_OPERATIONS
fi

# Horovod 0.28.1 needs CMake 3.x: CMake 4 rejects its bundled gloo (cmake_minimum_required < 3.5) and
# hands nvcc a -std=c++11 under which current GCC headers do not compile. Without a CMake 3 on PATH,
# pip's cmake<4 is used by its full path (HOROVOD_CMAKE), which works even when pip made no script.
cmake_major=$(cmake --version 2>/dev/null | sed -n 's/^cmake version \([0-9]*\).*/\1/p' || true)
if [ -z "$cmake_major" ] || [ "$cmake_major" -ge 4 ]; then
  if pip install -q "cmake>=3.18,<4"; then
    HOROVOD_CMAKE=$("$py" -c "import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, 'cmake'))")
    export HOROVOD_CMAKE
    log "CMake for the build: $HOROVOD_CMAKE"
  else  # offline with a wheelhouse that holds a Horovod wheel: nothing is compiled
    log "warning: no CMake 3 could be installed; only a prebuilt Horovod wheel can be installed"
  fi
fi
log "torch $("$py" -c 'import torch; print(torch.__version__)') needs -std=$cxx_std; building horovod==0.28.1"
start=$SECONDS
pip install --no-build-isolation horovod==0.28.1  # PIP_NO_CACHE_DIR=1 (the Dockerfile) skips the wheel cache
log "installed in $((SECONDS - start)) s"

"$py" - <<'PY'
import horovod
import horovod.torch as hvd

built = {"mpi": hvd.mpi_built(), "gloo": hvd.gloo_built(), "nccl": hvd.nccl_built()}
print(f"[build-horovod] horovod {horovod.__version__}: " + ", ".join(k for k, v in built.items() if v))
if not (built["mpi"] and built["gloo"]):
    raise SystemExit("[build-horovod] error: Horovod was built without MPI or Gloo")
PY
