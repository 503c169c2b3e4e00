#!/usr/bin/env bash
# Install relion-dynamight and what its tests need on a fresh machine (idempotent).
# torch is pinned to the CPU build that lies on this machine's disk; on a GPU cluster install your own
# CUDA build of torch first and this script leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = "0" ] && ! command -v relion_reconstruct >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq relion >/dev/null) \
    || echo "WARNING: could not install Debian's relion; RELION comparison tests will be skipped"
fi
# the viewer's tests run napari under Xvfb: Debian's xvfb and the X/GL libraries Qt's xcb plugin loads
XLIBS="xvfb libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0
       libxcb-xkb1 libxkbcommon-x11-0 libxcb-shape0 libxcb-cursor0 libgl1 libegl1 libgl1-mesa-dri libdbus-1-3
       libfontconfig1"
if [ "$(id -u)" = "0" ] && ! command -v xvfb-run >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $XLIBS >/dev/null) \
    || echo "WARNING: could not install xvfb; the napari viewer tests will be skipped"
fi
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
python3 -m pip install -q --disable-pip-version-check -e ".[gui]" \
  || echo "WARNING: could not install the gui extra (napari); the viewer tests will be skipped"
