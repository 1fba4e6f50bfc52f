"""The interop suite (`make test-interop`): loraforge's exports and adapters inside the real programs
(llama.cpp through llama-cpp-python, vLLM CPU). interop/setup.sh installs them first."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Reuse the main suite's fixtures (smol_folder, tiny models).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import *  # noqa: E402,F401,F403

INTEROP_CACHE = Path(os.environ.get("LORAFORGE_INTEROP_CACHE", Path.home() / ".cache/loraforge/interop"))
