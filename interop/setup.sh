#!/usr/bin/env bash
# Set up the real clients the interop suite drives (llama.cpp via llama-cpp-python, vLLM CPU).
# Built wheels and the vLLM venv are cached under $LORAFORGE_INTEROP_CACHE (default ~/.cache/loraforge/interop),
# so a second run is quick. Each part says what it is doing.
set -euo pipefail
cd "$(dirname "$0")/.."
export LORAFORGE_INTEROP_CACHE="${LORAFORGE_INTEROP_CACHE:-$HOME/.cache/loraforge/interop}"
mkdir -p "$LORAFORGE_INTEROP_CACHE"
for part in interop/setup_*.sh; do
    [ -e "$part" ] || continue
    echo "==> [interop] $part"
    bash "$part"
done
