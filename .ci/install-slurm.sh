#!/usr/bin/env bash
# Installs a single-node Slurm (slurm-wlm) and munge from Debian's packages, for tests/test_slurm.py.
# Idempotent: does nothing when the binaries are already there. Needs root (or sudo) and apt-get.
set -euo pipefail

need=(sbatch squeue scontrol sinfo slurmctld slurmd munged)
missing=()
for b in "${need[@]}"; do
  # The daemons live in /usr/sbin, which a non-root PATH may lack.
  command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-slurm: slurm-wlm and munge already installed"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-slurm: apt-get not found; install slurm-wlm and munge by hand (missing: ${missing[*]})" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "install-slurm: not root and no sudo; cannot install slurm-wlm and munge" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# slurm-client brings sbatch/squeue/sacct; slurm-wlm brings slurmctld and slurmd; munge the auth daemon.
$SUDO apt-get install -y -q --no-install-recommends slurm-wlm slurm-client munge
echo "install-slurm: installed slurm-wlm and munge"
