#!/usr/bin/env bash
# Build llama-cpp-python from source once into a cached wheel, then install it into the project venv.
#
# The build is CPU-only and generic (GGML_NATIVE=OFF, AVX-512 on, every AMX path off): the native build
# segfaults in ggml_backend_amx_mul_mat on this machine's Xeon. The multimodal (llava/mtmd) library is not
# built: the interop suite only needs text models, and it halves the build time.
# Python: $PYTHON, default .venv/bin/python (the Makefile's venv).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
PYTHON="${PYTHON:-.venv/bin/python}"
CACHE="${LORAFORGE_INTEROP_CACHE:-$HOME/.cache/loraforge/interop}"
WHEELS="$CACHE/wheels"

installed="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)"
if [ "$installed" = "$VERSION" ]; then
    echo "==> [llama.cpp] llama-cpp-python $VERSION already installed in $PYTHON"
    exit 0
fi

mkdir -p "$WHEELS"
wheel="$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
if [ -z "$wheel" ]; then
    echo "==> [llama.cpp] building llama-cpp-python $VERSION from source into $WHEELS (about 10 minutes on 2 cores)"
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
-DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
-DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DLLAVA_BUILD=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
    export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
    # --no-cache-dir: pip's own cache would hand back a wheel built with other CMAKE_ARGS.
    build="$(mktemp -d)"
    "$PYTHON" -m pip wheel --no-cache-dir --no-deps -w "$build" "llama-cpp-python==$VERSION"
    # Moved into the cache only once complete, so an interrupted build is never mistaken for a good one.
    mv "$build"/llama_cpp_python-"$VERSION"-*.whl "$WHEELS"/
    rmdir "$build" 2>/dev/null || true
    wheel="$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)"
else
    echo "==> [llama.cpp] using the cached wheel $wheel"
fi

echo "==> [llama.cpp] installing $(basename "$wheel") and its small dependencies into $PYTHON"
"$PYTHON" -m pip install --quiet "numpy>=1.20" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
"$PYTHON" -m pip install --quiet --no-deps "$wheel"
echo "==> [llama.cpp] done: $("$PYTHON" -c 'import llama_cpp; print("llama_cpp", llama_cpp.__version__)')"
