#!/usr/bin/env bash
# Installs everything hpcnoise needs into ./.venv: Open MPI (apt, when missing and root), torch and
# torchvision, Horovod 0.28.1 built with PyTorch + MPI + Gloo (and NCCL when a GPU is present), mpi4py,
# the package itself in editable mode with its test tools, and (as root) the Debian packages the Slurm
# and container tests use. Idempotent: on a ready machine it finishes in seconds.
#
# Variables (all optional):
#   HPCNOISE_VENV        virtual environment to create or reuse       (default: <repo>/.venv)
#   HPCNOISE_PYTHON      interpreter that creates it                  (default: python3)
#   HPCNOISE_TORCH       pip requirement(s) for torch and torchvision (default: torch==2.14.1 torchvision==0.29.1)
#   HPCNOISE_GPU         1 = Horovod with NCCL, 0 = CPU only           (default: 1 when nvidia-smi sees a GPU)
#                        with 1 the install fails, saying why, unless the Horovod installed has NCCL
#   HPCNOISE_WHEELS      where Horovod wheels are kept, one directory per torch, CUDA and build options
#                                                               (default: ~/.cache/hpcnoise/wheels)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${HPCNOISE_VENV:-$repo/.venv}
python=${HPCNOISE_PYTHON:-python3}
torch_req=${HPCNOISE_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
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
# A stamp of setup.cfg in the venv: a changed dependency list reinstalls, an unchanged one is skipped.
stamp="$venv/.hpcnoise-setup.cfg.sha256"
if ! sha256sum --status -c "$stamp" 2>/dev/null || ! "$py" -c "import hpcnoise" 2>/dev/null; then
  log "installing hpcnoise (editable) with its dependencies"
  pip install -e "${repo}[dev]"
  (cd "$repo" && sha256sum setup.cfg) | sed "s|setup.cfg|$repo/setup.cfg|" > "$stamp"
fi

# --- 4b. system packages the Slurm and container tests use (root only) ---------------------------
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  bash "$repo/tests/ci_deps.sh"
else
  log "not root: the Slurm and container tests need the Debian packages listed in tests/ci_deps.sh"
fi

# --- 5. Horovod ---------------------------------------------------------------------------------
# build-horovod.sh keeps a Horovod that imports and has what is asked (NCCL with HPCNOISE_GPU=1), else
# installs the wheel it built earlier for exactly this torch, CUDA and options, else compiles one
# (about 10 minutes on 2 cores); it fails unless the Horovod installed at the end has what is asked.
gpu=${HPCNOISE_GPU:-$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)}
if [ "$gpu" = 1 ]; then
  export HOROVOD_GPU_OPERATIONS=NCCL
else
  unset HOROVOD_GPU_OPERATIONS
fi
PYTHON="$py" bash "$repo/jobs/build-horovod.sh"

"$venv/bin/horovodrun" --check-build | sed -n '/Available Frameworks/,$p' | grep -E '\[X\]' | sed 's/^/[install] /'
log "ready: activate with 'source $venv/bin/activate'"
