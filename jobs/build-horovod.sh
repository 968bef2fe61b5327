#!/usr/bin/env bash
# Builds and installs Horovod 0.28.1 against the torch of one Python interpreter, with the PyTorch
# framework and the MPI and Gloo controllers (and NCCL for GPU operations when asked), and checks the
# result. Used by jobs/install.sh, and by containers/Dockerfile on top of an image that already has
# torch (NGC PyTorch).
#
#   bash jobs/build-horovod.sh          keep the Horovod installed if it is what is asked, else install one
#   bash jobs/build-horovod.sh --key    print the wheel directory for this torch and these options, and exit
#
# What is asked: a Horovod whose horovod.torch imports, with MPI and Gloo, and with NCCL when
# HOROVOD_GPU_OPERATIONS=NCCL. A Horovod already installed that is all of this is kept. Otherwise the
# wheel comes from $HPCNOISE_WHEELS/horovod-0.28.1/<key>/, where <key> names the Python, the platform,
# torch's version (with its local tag, +cpu or +cu130), torch's CUDA version and the build options
# (HOROVOD_GPU_OPERATIONS, and a hash of other Horovod build variables when any is set), e.g.
# cpython-311_linux-x86_64_torch2.14.1+cu130_cuda13.0_gpuops-NCCL: a wheel is only ever reused
# for exactly its key. Without one it is compiled (pip wheel --no-cache-dir: pip's wheel cache is keyed
# by the sdist alone, so it would hand back a wheel built with other options or another torch), and
# kept under its key only once it has passed the check. The script fails, with one line saying why,
# unless the Horovod installed at the end has what is asked; with NCCL asked and a CPU-only torch, or
# no nvcc, it fails before compiling anything.
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
#   HPCNOISE_WHEELS         where built wheels are kept, one directory per key
#                                              (default: ${XDG_CACHE_HOME:-~/.cache}/hpcnoise/wheels)
#   HPCNOISE_REAL_CXX       the C++ compiler behind the wrapper                 (default: $CXX, else g++)
#   MAKEFLAGS               parallel compile jobs                                (default: -j$(nproc))
#   PIP_*                   pip's own settings, e.g. PIP_FIND_LINKS=DIR to take a Horovod wheel built
#                           earlier for this same torch from DIR instead of compiling (it is checked like
#                           a compiled one); PIP_NO_CACHE_DIR (the Dockerfile) also keeps no wheel
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-python3}
version=0.28.1
log() { printf '[build-horovod] %s\n' "$*"; }
die() { printf '[build-horovod] error: %s\n' "$*" >&2; exit 1; }
pip() { "$py" -m pip --disable-pip-version-check "$@"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

case "${1:-}" in
  ""|--key) ;;
  *) die "unknown argument '$1' (usage: build-horovod.sh [--key])" ;;
esac
if [ "${HOROVOD_GPU_OPERATIONS:-}" = NCCL ]; then
  export HOROVOD_GPU_OPERATIONS
  nccl=1
else
  unset HOROVOD_GPU_OPERATIONS
  nccl=0
fi
asked="asked for NCCL (HOROVOD_GPU_OPERATIONS=NCCL, which jobs/install.sh sets for HPCNOISE_GPU=1)"
cpu_only="install a CUDA torch (HPCNOISE_TORCH), a CUDA toolkit and NCCL, or build CPU-only (HPCNOISE_GPU=0)"

# --- what is asked, and the key of its wheel ------------------------------------------------------
# Lines: torch version, torch's CUDA version (empty for a CPU torch), key.
info=$("$py" - "${HOROVOD_GPU_OPERATIONS:-}" <<'PY'
import hashlib
import os
import sys
import sysconfig

import torch

# Horovod build variables that change what is compiled, besides HOROVOD_GPU_OPERATIONS: when any is set,
# a hash of them joins the key (the default key stays readable).
BUILD_VARS = (
    "HOROVOD_GPU", "HOROVOD_GPU_ALLREDUCE", "HOROVOD_GPU_ALLGATHER", "HOROVOD_GPU_BROADCAST",
    "HOROVOD_GPU_ALLTOALL", "HOROVOD_CPU_OPERATIONS", "HOROVOD_NCCL_LINK", "HOROVOD_BUILD_CUDA_CC_LIST",
    "HOROVOD_WITHOUT_NVTX",
)
cuda = torch.version.cuda or ""
parts = [
    sys.implementation.cache_tag,  # cpython-311
    sysconfig.get_platform(),  # linux-x86_64
    f"torch{torch.__version__}",  # with its local tag: 2.14.1+cpu, 2.14.1+cu130
    f"cuda{cuda or 'none'}",
    f"gpuops-{sys.argv[1] or 'none'}",
]
extra = ";".join(f"{k}={os.environ[k]}" for k in BUILD_VARS if os.environ.get(k))
if extra:
    parts.append("opts-" + hashlib.sha256(extra.encode()).hexdigest()[:12])
print(torch.__version__, cuda, "_".join(parts), sep="\n")
PY
)
{ read -r torch_version; read -r torch_cuda; read -r key; } <<<"$info"
wheels=${HPCNOISE_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcnoise/wheels}/horovod-$version/$key
if [ "${1:-}" = --key ]; then
  printf '%s\n' "$wheels"
  exit 0
fi
if [ "$nccl" = 1 ] && [ -z "$torch_cuda" ]; then
  die "$asked, but torch $torch_version is a CPU-only build and cannot build NCCL operations; $cpu_only"
fi

# The check of a Horovod: prints "horovod 0.28.1: mpi, gloo[, nccl]", or fails with one line that says why.
# Arguments: where the Horovod came from ("installed", "from WHEEL", "just built"), a hint for errors.
check() {
  "$py" - "$nccl" "$asked" "$1" "$2" <<'PY'
import sys

nccl_asked, asked, origin, hint = sys.argv[1] == "1", *sys.argv[2:]
try:
    import horovod
    import horovod.torch as hvd
except Exception as e:  # not there, or built against another torch or MPI (undefined symbols)
    if isinstance(e, ModuleNotFoundError) and e.name == "horovod":
        raise SystemExit(f"[build-horovod] error: no Horovod is installed{hint}")
    raise SystemExit(f"[build-horovod] error: the Horovod {origin} does not import (horovod.torch: {e}){hint}")
built = {"mpi": hvd.mpi_built(), "gloo": hvd.gloo_built(), "nccl": hvd.nccl_built()}
have = ", ".join(k for k, v in built.items() if v) or "none"
if not (built["mpi"] and built["gloo"]):
    raise SystemExit(f"[build-horovod] error: the Horovod {origin} lacks MPI or Gloo (it has: {have}){hint}")
if nccl_asked and not built["nccl"]:
    raise SystemExit(f"[build-horovod] error: {asked}, but the Horovod {origin} has no NCCL (it has: {have}){hint}")
print(f"horovod {horovod.__version__}: {have}")
PY
}

found=$(check installed "" 2>&1) && ok=1 || ok=0
found=${found##*$'\n'}  # the verdict, after whatever the imports printed
if [ "$ok" = 1 ]; then
  log "keeping the Horovod installed, it is what is asked ($found)"
  exit 0
fi
log "installing Horovod $version for torch $torch_version: ${found#"[build-horovod] error: "}"

# --- the wheel: kept for this key, else built --------------------------------------------------------
whl=$(find "$wheels" -maxdepth 1 -name "horovod-$version-*.whl" 2>/dev/null | sort | tail -n 1 || true)
if [ -n "$whl" ]; then
  log "taking the wheel built earlier for this torch and these options: $whl"
  origin="from $whl" hint="; remove $wheels to compile it anew"
else
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
  if [ -n "$torch_cuda" ] && [ -z "${CUDAToolkit_ROOT:-}" ]; then
    # cudart may live in lib/ rather than lib64/: a directory with a libcudart.so link goes on
    # CMAKE_LIBRARY_PATH so that CMake's FindCUDAToolkit sees it.
    for d in ${CUDA_HOME:+"$CUDA_HOME"} /usr/local/cuda "$torch_site"/nvidia/cu1[0-9] "$site"/nvidia/cu1[0-9]; do
      [ -d "$d" ] || continue
      cudart=$(find "$d/" -name 'libcudart.so*' | sort | head -n 1)
      if [ -f "$d/include/cuda_runtime.h" ] && [ -n "$cudart" ]; then
        export CUDAToolkit_ROOT=$d
        mkdir -p "$tmp/lib"
        ln -sf "$cudart" "$tmp/lib/libcudart.so"
        export CMAKE_LIBRARY_PATH="$tmp/lib${CMAKE_LIBRARY_PATH:+:$CMAKE_LIBRARY_PATH}"
        log "CUDA toolkit for the build: $d"
        break
      fi
    done
  fi
  if [ "$nccl" = 1 ]; then
    # Horovod's CMake and its nvcc flags take the toolkit's nvcc when HOROVOD_CUDA_HOME names it.
    if [ -z "${HOROVOD_CUDA_HOME:-}" ] && [ -x "${CUDAToolkit_ROOT:-/nonexistent}/bin/nvcc" ]; then
      export HOROVOD_CUDA_HOME=$CUDAToolkit_ROOT
    fi
    nvcc=${HOROVOD_CUDA_HOME:+$HOROVOD_CUDA_HOME/bin/nvcc}
    nvcc=${nvcc:-${CUDACXX:-$(command -v nvcc || true)}}
    if [ -z "$nvcc" ] || [ ! -x "$nvcc" ]; then
      die "$asked, but no CUDA compiler was found (nvcc on PATH, \$CUDACXX, or bin/nvcc in \$CUDA_HOME or" \
          "/usr/local/cuda); load the cluster's CUDA module or set CUDA_HOME, or build CPU-only (HPCNOISE_GPU=0)"
    fi
    if [ -z "${HOROVOD_NCCL_HOME:-}" ] && [ -d "$torch_site/nvidia/nccl" ]; then
      export HOROVOD_NCCL_HOME="$torch_site/nvidia/nccl"
    fi
    # pip's NCCL ships only libnccl.so.2, and CMake's find_library looks for libnccl.so: a link to it.
    if [ -n "${HOROVOD_NCCL_HOME:-}" ] && [ ! -e "$HOROVOD_NCCL_HOME/lib/libnccl.so" ] \
       && [ -e "$HOROVOD_NCCL_HOME/lib/libnccl.so.2" ] && [ -z "${HOROVOD_NCCL_LIB:-}" ]; then
      mkdir -p "$tmp/nccl"
      ln -sf "$HOROVOD_NCCL_HOME/lib/libnccl.so.2" "$tmp/nccl/libnccl.so"
      export HOROVOD_NCCL_LIB="$tmp/nccl" HOROVOD_NCCL_INCLUDE="$HOROVOD_NCCL_HOME/include" HOROVOD_NCCL_LINK=SHARED
    fi
    log "GPU operations through NCCL${HOROVOD_NCCL_HOME:+ ($HOROVOD_NCCL_HOME)}, nvcc $nvcc"
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
  log "building horovod==$version against torch $torch_version, -std=$cxx_std (compiling: about 10 minutes on 2 cores)"
  start=$SECONDS
  if ! pip wheel --no-cache-dir --no-deps --no-build-isolation -w "$tmp/wheel" "horovod==$version"; then
    if [ "$nccl" = 1 ]; then
      die "pip could not build Horovod $version with NCCL (its output is above); $cpu_only"
    fi
    die "pip could not build Horovod $version (its output is above)"
  fi
  whl=$(find "$tmp/wheel" -maxdepth 1 -name "horovod-$version-*.whl" | head -n 1)
  [ -n "$whl" ] || die "pip wheel made no horovod-$version wheel in $tmp/wheel"
  log "built $(basename "$whl") in $((SECONDS - start)) s"
  origin="just built" hint=""
  if [ "$nccl" = 1 ]; then hint="; $cpu_only"; fi
fi

# --- install, check, keep ---------------------------------------------------------------------------
if pip show -q horovod 2>/dev/null; then
  pip uninstall -q -y horovod
fi
pip install -q "$whl" || die "pip could not install $whl (its output is above)"
found=$(check "$origin" "$hint") || exit 1
log "${found##*$'\n'}"
# Kept only once checked, and atomically (a copy under a hidden name, then a rename): a directory only
# ever holds wheels that are what its key says. Not keeping one is no failure: the install is done.
name=$(basename "$whl")
if [ "$whl" != "$wheels/$name" ] && [ -z "${PIP_NO_CACHE_DIR:-}" ]; then
  if mkdir -p "$wheels" && cp "$whl" "$wheels/.$name.partial" && mv "$wheels/.$name.partial" "$wheels/$name"; then
    log "kept the wheel for this torch and these options in $wheels"
  else
    log "warning: could not keep the wheel in $wheels (HPCNOISE_WHEELS); the next install compiles again"
  fi
fi
