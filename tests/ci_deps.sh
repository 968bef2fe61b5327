#!/usr/bin/env bash
# Installs the Debian packages that the Slurm, job-script and container tests need, when missing:
#   slurm-wlm munge    a real single-node Slurm (slurmctld, slurmd, srun with PMIx) and its authentication
#   openmpi-bin        mpirun inside allocations (libopenmpi-dev: headers for mpi4py and Horovod)
#   (linter) shellcheck, run on jobs/*.sh, jobs/*.sbatch and tests/*.sh
#   docker.io          dockerd for the container build-and-run test
#   debootstrap        a minimal local Debian root file system for the container test's base image
# Idempotent: when everything is present it only asks dpkg (well under a second). Needs root and apt-get.
#
# Variables (all optional):
#   CI_DEPS_EXTRA      more Debian packages to install, space separated   (default: none)
set -euo pipefail

# shellcheck disable=SC2206  # CI_DEPS_EXTRA is a space-separated list
packages=(slurm-wlm munge openmpi-bin libopenmpi-dev shellcheck docker.io debootstrap ${CI_DEPS_EXTRA:-})

missing=()
for p in "${packages[@]}"; do
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
    missing+=("$p")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "[ci_deps] all present: ${packages[*]}"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[ci_deps] error: missing Debian packages (${missing[*]}); run this script as root on Debian/Ubuntu" >&2
  exit 1
fi
echo "[ci_deps] installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Wait for another apt/dpkg on the machine instead of failing on its lock.
apt_opts=(-o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
apt-get "${apt_opts[@]}" update -qq
apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "[ci_deps] done"
