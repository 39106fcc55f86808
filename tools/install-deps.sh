#!/usr/bin/env bash
# Installs what building and testing flashattn needs on Debian/Ubuntu, or says what is missing.
# Usage: tools/install-deps.sh [--python]
set -euo pipefail

packages=(cmake ninja-build g++ libopenblas-dev libgtest-dev libcli11-dev nlohmann-json3-dev
          python3 python3-dev python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]] && ! command -v sudo >/dev/null; then
    echo "flashattn: missing packages: ${missing[*]}" >&2
    echo "  install them with: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  echo "flashattn: installing ${missing[*]}" >&2
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >/dev/null
fi
