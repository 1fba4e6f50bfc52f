#!/usr/bin/env bash
# Set up the real clients the interop suite drives (llama.cpp via llama-cpp-python, vLLM CPU).
# Built wheels and the vLLM venv are cached under $LORAFORGE_INTEROP_CACHE (default ~/.cache/loraforge/interop),
# so a second run is quick. The parts (interop/setup_*.sh) run side by side: the llama.cpp build is bound by
# the compiler, vLLM's install mostly by unpacking. Each output line is tagged with its part.
set -euo pipefail
cd "$(dirname "$0")/.."
export LORAFORGE_INTEROP_CACHE="${LORAFORGE_INTEROP_CACHE:-$HOME/.cache/loraforge/interop}"
mkdir -p "$LORAFORGE_INTEROP_CACHE"
pids=() names=()
for part in interop/setup_*.sh; do
    [ -e "$part" ] || continue
    name="$(basename "$part" .sh)"
    echo "==> [interop] starting $part"
    ( set -o pipefail; bash "$part" 2>&1 | sed -u "s/^/[$name] /" ) &
    pids+=("$!") names+=("$name")
done
failed=()
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${names[$i]}")
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "==> [interop] set-up failed: ${failed[*]} (its lines above say why)" >&2
    exit 1
fi
echo "==> [interop] set-up done"
