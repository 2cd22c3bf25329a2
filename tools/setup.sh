#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build statemamba: Debian packages and a venv
# holding the PyPI torch wheel whose LibTorch the build links. Idempotent; quiet when all is there.
set -euo pipefail

TORCH_VERSION=2.11.0
VENV=${STATEMAMBA_VENV:-$HOME/.cache/statemamba/venv-torch-$TORCH_VERSION}
APT_PACKAGES=(build-essential cmake ninja-build ccache git python3-venv
              libhdf5-dev libcxxopts-dev libgtest-dev nlohmann-json3-dev zlib1g-dev)

say() { echo "[setup] $*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing Debian packages: ${missing[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! "$VENV/bin/python" -c "import torch, pytest, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "creating $VENV with torch==$TORCH_VERSION (a few GB the first time; pip's cache is kept)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" numpy pytest
fi
echo "$VENV"
