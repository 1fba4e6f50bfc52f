"""Our Llama implementation against transformers' on tiny random models, the KV cache, and loading errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_folder
from transformers import AutoModelForCausalLM

from loraforge.errors import LoraForgeError
from loraforge.generate import SamplingParams, generate_ids
from loraforge.model import KVCache, load_model


def hf_logits(folder, ids, **kw):
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids, **kw).logits


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"attention_bias": True, "mlp_bias": True},
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32}, "rope_theta": 500000.0},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ],
    ids=["plain", "tied", "bias", "llama3-rope", "linear-rope"],
)
def test_logits_match_transformers(tmp_path, smol_folder, overrides):
    folder = make_tiny_folder(tmp_path / "m", smol_folder, seed=1, **overrides)
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(ours, hf_logits(folder, ids), atol=1e-5, rtol=1e-5)


def test_loss_matches_transformers(tiny_folder, tiny):
    model, _ = tiny
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(ids, labels=labels)
        theirs = hf(ids, labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_loss_gradient_matches_full_logits(tiny):
    """The chunked loss gives the same gradients as cross-entropy over materialised logits."""
    from loraforge.model import loss as loss_mod

    model, _ = tiny
    model.model.norm.weight.requires_grad_(True)
    ids = torch.randint(0, 49152, (3, 20), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[1, :7] = -100
    old = loss_mod.CHUNK_TOKENS
    try:
        loss_mod.CHUNK_TOKENS = 7  # several chunks, one partial
        model(ids, labels=labels).backward()
        g_chunked = model.model.norm.weight.grad.clone()
    finally:
        loss_mod.CHUNK_TOKENS = old
    model.model.norm.weight.grad = None
    logits = model(ids)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    ref.backward()
    torch.testing.assert_close(g_chunked, model.model.norm.weight.grad, atol=1e-5, rtol=1e-4)


def test_kv_cache_decoding_equals_full_forward(tiny):
    model, _ = tiny
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 2, 16)
        steps = [model(ids[:, :8], cache=cache)]
        for t in range(8, 12):
            steps.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_batch_generates_like_each_prompt_alone(tiny):
    model, _ = tiny
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42, 43], [1000, 2000, 3000, 4000]]
    p = SamplingParams(max_new_tokens=6)
    together = generate_ids(model, prompts, p, eos_ids=set())
    alone = [generate_ids(model, [q], p, eos_ids=set())[0] for q in prompts]
    assert together == alone
    assert all(len(t) == 6 for t in together)


def test_greedy_matches_transformers_generate(tiny_folder, tiny):
    model, _ = tiny
    prompt = [11, 22, 33, 44, 55]
    ours = generate_ids(model, [prompt], SamplingParams(max_new_tokens=8), eos_ids=set())[0]
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                      pad_token_id=0, min_new_tokens=8)
    assert ours == out[0, len(prompt):].tolist()


def test_min_tokens_holds_back_end_of_sequence_like_transformers(tiny_folder, tiny):
    """min_tokens masks end-of-sequence for the first tokens, as transformers' min_new_tokens does."""
    model, _ = tiny
    prompt = [11, 22, 33, 44, 55]
    first = generate_ids(model, [prompt], SamplingParams(max_new_tokens=1), eos_ids=set())[0][0]
    assert generate_ids(model, [prompt], SamplingParams(max_new_tokens=8), eos_ids={first})[0] == [first]
    ours = generate_ids(model, [prompt], SamplingParams(max_new_tokens=8, min_tokens=3), eos_ids={first})[0]
    assert len(ours) >= 3 and first not in ours[:3]
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=first,
                      pad_token_id=0, min_new_tokens=3)
    assert ours == out[0, len(prompt):].tolist()


def test_loaded_model_is_frozen_and_dtype_follows_input(tiny):
    model, _ = tiny
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


# -- errors a user can cause ------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(LoraForgeError, match="no such file or folder"):
        load_model(str(tmp_path / "nope"))


def test_folder_without_weights(tmp_path, tiny_folder):
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    with pytest.raises(LoraForgeError, match="no weights"):
        load_model(str(tmp_path))


def test_pickle_only_weights_refused(tmp_path, tiny_folder):
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LoraForgeError, match="pickle"):
        load_model(str(tmp_path))


def test_unsupported_architecture(tmp_path, tiny_folder):
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraForgeError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(str(tmp_path))


def test_corrupt_safetensors(tmp_path, tiny_folder):
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    data = (tiny_folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(LoraForgeError, match="model.safetensors"):
        load_model(str(tmp_path))


def test_shape_mismatch_names_the_tensor(tmp_path, tiny_folder):
    cfg = json.loads((tiny_folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(tiny_folder / "model.safetensors")
    with pytest.raises(LoraForgeError, match="mlp"):
        load_model(str(tmp_path))


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    with pytest.raises(LoraForgeError, match="not a .txt file"):
        load_model(str(f))


@pytest.mark.parametrize("tokens", [1, 2, 8, 64, 65])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("d_in", [48, 1024])  # 1024: a long input, F.linear's kernel at 5-11 tokens
def test_frozen_linear_equals_f_linear(tokens, with_bias, d_in):
    """The few-token GEMM form (W @ x^T) gives F.linear's values and shape, contiguous or as a view, for a
    row-major input and for a strided one (the transposed output of an earlier product)."""
    from loraforge.ops import frozen_linear

    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(1, tokens, d_in, generator=g)
    w, b = torch.randn(40, d_in, generator=g), (torch.randn(40, generator=g) if with_bias else None)
    want = torch.nn.functional.linear(x, w, b)
    strided = torch.randn(d_in, tokens, generator=g).t()[None]  # [1, tokens, d_in], not row-major
    want_strided = torch.nn.functional.linear(strided, w, b)
    with torch.no_grad():
        for contiguous in (True, False):
            got = frozen_linear(x, w, b, contiguous=contiguous)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
            if contiguous:
                assert got.is_contiguous()
            torch.testing.assert_close(frozen_linear(strided, w, b, contiguous=contiguous), want_strided, atol=1e-4, rtol=1e-5)
    w.requires_grad_(True)  # with autograd recording, it is F.linear itself
    frozen_linear(x, w, b).sum().backward()
    assert w.grad is not None


def test_generate_refuses_prompt_ids_outside_the_vocabulary(tmp_path, smol_folder):
    """A model whose vocabulary is smaller than its tokenizer's ids: one sentence, not an IndexError."""
    from loraforge.errors import LoraForgeError
    from loraforge.generate import SamplingParams, generate_ids
    from loraforge.model import load_model

    folder = make_tiny_folder(tmp_path / "m", smol_folder, vocab_size=96)
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    with pytest.raises(LoraForgeError, match="outside the model's vocabulary of 96"):
        generate_ids(model, [[5, 6], [7, 4000]], SamplingParams(max_new_tokens=2), set())
