"""Shared fixtures: tiny seeded random Llama models (fast) and the embedded SmolLM2 (a few integration tests)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: a second thread only adds synchronisation cost
    (a lot of it when the two cores are shared with other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def isolated_rng():
    """Put torch's, Python's and NumPy's global generators back as they were after the test, so that what
    it draws (an adapter's init, a shuffle) does not change the draws of the tests that follow."""
    import random

    import numpy as np

    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    yield
    torch.set_rng_state(states[0])
    random.setstate(states[1])
    np.random.set_state(states[2])


def randomize_adapter(model, name: str, seed: int = 0, std: float = 0.1) -> torch.Generator:
    """Seeded random values in every tensor of LoRA adapter `name` (a fresh adapter's zero B changes nothing).
    Returns the generator, for drawing test data after the weights."""
    from loraforge.lora import get_adapter_params

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in get_adapter_params(model, name).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return g


@pytest.fixture(scope="session")
def smol_folder() -> Path:
    """The embedded SmolLM2-135M-Instruct as a Hugging Face folder (converted once into the cache)."""
    from loraforge.model import resolve_source

    return resolve_source(None).folder


def make_tiny_folder(dest: Path, tokenizer_src: Path, seed: int = 0, **overrides) -> Path:
    """A random Llama saved by transformers itself, with SmolLM2's real tokenizer (vocab 49,152)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-5,
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).float()
    with torch.no_grad():  # transformers initialises with std 0.02; larger weights make differences visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(str(dest))
    for f in TOKENIZER_FILES:
        if (tokenizer_src / f).exists():
            shutil.copy(tokenizer_src / f, dest / f)
    return dest


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, smol_folder) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny") / "tiny-llama", smol_folder)


@pytest.fixture()
def tiny(tiny_folder):
    """(our model, tokenizer) for the tiny random Llama, fresh for each test."""
    from loraforge.model import load_model

    return load_model(str(tiny_folder), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smol(smol_folder):
    """(our model, tokenizer) for the embedded model; shared, so tests must not leave adapters on it."""
    from loraforge.model import load_model

    return load_model(None, device="cpu", dtype="float32")
