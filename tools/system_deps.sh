#!/usr/bin/env bash
# Installs the Debian packages the tests exercise for real. Idempotent and quiet when
# everything is present; needs root (or sudo) only when something is missing.
set -euo pipefail
# binary -> package
declare -A NEED=(
  [bwrap]=bubblewrap
  [unshare]=util-linux
  [slurmctld]=slurmctld
  [slurmd]=slurmd
  [sbatch]=slurm-client
  [munged]=munge
  [patch]=patch
)
missing=()
for bin in "${!NEED[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("${NEED[$bin]}")
done
# The sandbox's seccomp filter is built with libseccomp (loaded with ctypes).
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2 ' || missing+=(libseccomp2)
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
