"""The interop suite (`make test-interop`): loraforge's exports and adapters inside the real programs
(llama.cpp through llama-cpp-python, vLLM CPU). interop/setup.sh installs them first."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Reuse the main suite's fixtures (smol_folder, make_tiny_folder, ...) under another module name: both
# files are called conftest.py, so a plain import would find this one.
_spec = importlib.util.spec_from_file_location(
    "loraforge_main_conftest", Path(__file__).resolve().parent.parent / "tests" / "conftest.py")
_main = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_main)
globals().update({k: v for k, v in vars(_main).items() if not k.startswith("_")})

INTEROP_CACHE = Path(os.environ.get("LORAFORGE_INTEROP_CACHE", Path.home() / ".cache/loraforge/interop"))
