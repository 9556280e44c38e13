#!/usr/bin/env bash
# Installs the Debian packages the demo and the tests use, if any is missing.
# Needs root (or sudo). Rust itself must already be installed.
set -euo pipefail
packages=(nbdkit nbd-server libnbd-bin qemu-utils systemd file libssl-dev pkg-config)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${missing[@]}"
