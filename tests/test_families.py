"""Every supported family against transformers and PEFT, on tiny seeded random models built by transformers.

For each family: logits equal transformers' (fp32); cached greedy generation equals transformers' generate
past the sliding window; a PEFT adapter loaded by us gives PEFT's logits and ours loaded by PEFT gives ours;
a mixed-adapter batch equals its rows run alone; NF4 codes equal bitsandbytes'.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TOKENIZER_FILES, randomize_adapter

from loraforge.generate import SamplingParams, generate_ids
from loraforge.lora import LoraConfig, adapter_ids_for, add_lora, load_adapter, save_adapter, set_adapter
from loraforge.model import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, WINDOW = 96, 6
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, tie_word_embeddings=False)
# Each family with the features that set it apart switched on, windows smaller than the generated length.
FAMILIES = {
    "llama": dict(attention_bias=True, mlp_bias=True,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16}),
    "mistral": dict(sliding_window=WINDOW),
    "mixtral": dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=True),
    "qwen3": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 32}),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=False),
    "gemma": dict(head_dim=16, tie_word_embeddings=True),
    "gemma2": dict(sliding_window=WINDOW, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0),
    "gemma3_text": dict(sliding_window=WINDOW, query_pre_attn_scalar=12, layer_types=["sliding_attention", "full_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 10000.0}}),
    "phi3": dict(sliding_window=WINDOW),
    "olmo2": dict(),
}


MOE = ("mixtral", "qwen3_moe")


def build(family: str, dest, tokenizer_src, seed: int = 0, **overrides):
    """A random transformers model of `family`, saved to `dest` with a tokenizer; returns it (fp32, eval)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, **{**BASE, **FAMILIES[family], **overrides})
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # larger than transformers' init, so every term shows in the logits
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.25)
            else:  # norm weights and biases: off their init, so (1 + w) vs w and biases matter
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(str(dest))
    for f in TOKENIZER_FILES:
        if (tokenizer_src / f).exists():
            shutil.copy(tokenizer_src / f, dest / f)
    return hf


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, smol_folder):
    """(name, folder, transformers model) per family, built once for the module."""
    folder = tmp_path_factory.mktemp(request.param) / request.param
    return request.param, folder, build(request.param, folder, smol_folder)


def ids(B=2, S=14, seed=0):
    return torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def assert_mixed_equals_rows_alone(model, x, names):
    """One forward of the rows of x, each on its adapter in `names` (None: the base), equals each row run
    alone with its adapter active."""
    with torch.no_grad():
        mixed = model(x, adapter_ids=adapter_ids_for(model, names))
        for row, a in enumerate(names):
            set_adapter(model, a)
            torch.testing.assert_close(mixed[row], model(x[row:row + 1])[0], rtol=1e-5, atol=1e-5)


def assert_logits_close(ours, theirs):
    """fp32: equal to 1e-5 of the logits' scale."""
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5 * max(scale, 1.0))


def test_logits_equal_transformers(family):
    name, folder, hf = family
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    x = ids()
    with torch.no_grad():
        assert_logits_close(model(x), hf(x).logits)


def test_cached_greedy_generation_equals_transformers_past_the_window(family):
    name, folder, hf = family
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    prompt = ids(1, 5, seed=1)[0].tolist()
    n = 3 * WINDOW  # well past every sliding window
    ours = generate_ids(model, [prompt], SamplingParams(max_new_tokens=n, min_tokens=n), eos_ids={2})[0]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0, eos_token_id=2)
    assert ours == out[0, len(prompt):].tolist()


def test_peft_adapter_loaded_by_us_gives_peft_logits(family, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    name, folder, hf = family
    # PEFT's all-linear on a MoE model also adapts the router (target_parameters), which loraforge refuses;
    # there the attention projections are the targets (expert adapters: tests/test_moe_lora.py).
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if name in MOE else "all-linear"
    pm = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    try:
        pm.eval()
        pm.save_pretrained(str(tmp_path / "peft"))
        x = ids(seed=2)
        with torch.no_grad():
            theirs = pm(x).logits
            with pm.disable_adapter():
                base = pm(x).logits
    finally:
        pm.unload()  # the module-scoped transformers model without PEFT's wrappers
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    load_adapter(model, tmp_path / "peft", "p")
    with torch.no_grad():
        ours = model(x)
    assert_logits_close(ours, theirs)
    assert (theirs - base).abs().max() > 0.1  # the adapter matters


def test_our_adapter_loaded_by_peft_gives_ours(family, tmp_path):
    from peft import PeftModel

    name, folder, hf = family
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    add_lora(model, "mine", LoraConfig(r=4, alpha=8, dropout=0.0))
    randomize_adapter(model, "mine", seed=3)
    save_adapter(model, "mine", tmp_path / "mine")
    x = ids(seed=3)
    with torch.no_grad():
        ours = model(x)
    pm = PeftModel.from_pretrained(hf, str(tmp_path / "mine")).eval()
    try:
        with torch.no_grad():
            assert_logits_close(ours, pm(x).logits)
    finally:
        pm.unload()


def test_mixed_batch_equals_rows_alone(family):
    name, folder, _ = family
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    for i, a in enumerate(("a", "b")):
        add_lora(model, a, LoraConfig(r=2 + i, alpha=4, dropout=0.0))
        randomize_adapter(model, a, seed=10 + i)
    assert_mixed_equals_rows_alone(model, ids(3, 10, seed=4), ["a", None, "b"])


def test_qwen3_moe_dense_layers_equal_transformers(tmp_path, smol_folder):
    """mlp_only_layers / decoder_sparse_step: those layers have a dense MLP instead of experts."""
    hf = build("qwen3_moe", tmp_path / "m", smol_folder, num_hidden_layers=3, mlp_only_layers=[0],
               decoder_sparse_step=2, layer_types=None)
    model, _ = load_model(str(tmp_path / "m"), device="cpu", dtype="float32")
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["MLP", "MoE", "MLP"]
    x = ids()
    with torch.no_grad():
        assert_logits_close(model(x), hf(x).logits)


def test_peft_prefix_adapter_gives_peft_logits(family, tmp_path):
    """Prefix tuning, with sliding windows (the prefix slides out of them) and soft-capping."""
    from peft import PrefixTuningConfig, get_peft_model

    from loraforge.adapters import attach_adapter
    from loraforge.prefix import with_active_prefix

    name, folder, hf = family
    # prompt learning leaves the transformers model's modules as they are: nothing to unload afterwards
    pm = get_peft_model(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.normal_()
    pm.eval().save_pretrained(str(tmp_path / "prefix"))
    x = ids(seed=5)
    with torch.no_grad():
        theirs = pm(x).logits
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    attach_adapter(model, tmp_path / "prefix")
    with torch.no_grad():
        ours = model(**with_active_prefix(model, {"input_ids": x}))
    assert_logits_close(ours, theirs)
    # cached generation (the prefix as the first cached keys) past the window equals greedy full forwards
    n, seq = 2 * WINDOW, x[:1, :4]
    got = generate_ids(model, [seq[0].tolist()], SamplingParams(max_new_tokens=n, min_tokens=n), eos_ids={2})[0]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(**with_active_prefix(model, {"input_ids": seq}))[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    assert got == seq[0, 4:].tolist()


def test_serving_engine_equals_transformers_past_the_window(family, tmp_path):
    """Continuous batching (right-padded batched prefill, per-row decode positions) with a LoRA row beside
    base rows: base rows equal transformers' generate, the adapter row equals our one-adapter path."""
    from loraforge.serve.engine import Engine

    name, folder, hf = family
    model, tok = load_model(str(folder), device="cpu", dtype="float32")
    add_lora(model, "a", LoraConfig(r=4, alpha=8, dropout=0.0))
    randomize_adapter(model, "a", seed=6)
    save_adapter(model, "a", tmp_path / "a")
    base_model, _ = load_model(str(folder), device="cpu", dtype="float32")
    engine = Engine(base_model, tok, max_batch=3, max_len=64)
    engine.load_adapter("a", tmp_path / "a")
    n = 2 * WINDOW
    sp = SamplingParams(max_new_tokens=n, min_tokens=n)
    prompts = [ids(1, L, seed=7 + L)[0].tolist() for L in (3, 7, 5)]
    got = [c.token_ids for c in engine.generate(prompts, sp, [None, "a", None])]
    for p in (prompts[0], prompts[2]):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, eos_token_id=2)
        assert got[prompts.index(p)] == out[0, len(p):].tolist()
    assert got[1] == generate_ids(model, [prompts[1]], sp, eos_ids={2})[0]


def test_training_loss_and_lora_gradients_equal_peft(family, tmp_path):
    """The training path (chunked loss, soft-capped head, fused LoRA op, recomputed activations) gives
    PEFT's loss and adapter gradients."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from loraforge.lora import get_adapter_params, set_trainable_params

    name, folder, hf = family
    pm = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "qkv_proj", "o_proj"],
                                           init_lora_weights=False))
    x = ids(seed=8)
    try:
        pm.train()
        loss_theirs = pm(input_ids=x, labels=x).loss
        loss_theirs.backward()
        grads = {k.replace("base_model.model.", "").replace(".default", ""): p.grad.clone()
                 for k, p in pm.named_parameters() if p.requires_grad}
        pm.save_pretrained(str(tmp_path / "peft"))
    finally:
        pm.unload()
        hf.eval()
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    load_adapter(model, tmp_path / "peft", "p")
    set_trainable_params(model, "p")
    model.train()
    loss = model(x, labels=x)
    loss.backward()
    torch.testing.assert_close(loss, loss_theirs, rtol=1e-5, atol=1e-6)
    params = get_adapter_params(model, "p")
    assert len(params) == len(grads)
    for key, p in params.items():
        torch.testing.assert_close(p.grad, grads[f"{key}.weight"], rtol=1e-4, atol=1e-6)


def test_merged_export_loads_in_transformers(family, tmp_path):
    """merge_adapter / unmerge_adapter are exact, and `save_merged` writes a folder transformers reads back
    with the adapter's logits (Phi-3's fused projections, tied embeddings and MoE experts included)."""
    from transformers import AutoModelForCausalLM

    from loraforge.lora import merge_adapter, save_merged, unmerge_adapter

    name, folder, _ = family
    model, tok = load_model(str(folder), device="cpu", dtype="float32")
    add_lora(model, "m", LoraConfig(r=4, alpha=8, dropout=0.0))
    randomize_adapter(model, "m", seed=9)
    x = ids(seed=9)
    with torch.no_grad():
        ours = model(x)
        merge_adapter(model)
        assert_logits_close(model(x), ours)
        unmerge_adapter(model)
    save_merged(model, tok, tmp_path / "merged", "m")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert_logits_close(merged(x).logits, ours)


def test_left_padded_batch_generation_equals_each_prompt_alone(family):
    """Left padding shifts a row's slots, not its window: each row generates what it does alone."""
    name, folder, _ = family
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    n = 2 * WINDOW
    sp = SamplingParams(max_new_tokens=n, min_tokens=n)
    prompts = [ids(1, L, seed=20 + L)[0].tolist() for L in (2, 9, 5)]
    alone = [generate_ids(model, [p], sp, eos_ids={2})[0] for p in prompts]
    assert generate_ids(model, prompts, sp, eos_ids={2}) == alone


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_serving_engine_prefix_row_past_the_window(name, tmp_path, smol_folder):
    """A prefix adapter's row in the serving engine (its prefix the first slots of its row, sliding out of
    the window) beside a base row equals our one-adapter cached generation."""
    from loraforge.prefix import PrefixConfig, add_prefix, save_prefix_adapter
    from loraforge.serve.engine import Engine

    build(name, tmp_path / "m", smol_folder)
    model, tok = load_model(str(tmp_path / "m"), device="cpu", dtype="float32")
    torch.manual_seed(0)
    add_prefix(model, "p", PrefixConfig(num_virtual_tokens=3, init="normal"))
    save_prefix_adapter(model, "p", tmp_path / "p")
    n = 2 * WINDOW
    sp = SamplingParams(max_new_tokens=n, min_tokens=n)
    prompts = [ids(1, L, seed=30 + L)[0].tolist() for L in (4, 6)]
    want = generate_ids(model, [prompts[0]], sp, eos_ids={2})[0]  # the active prefix adapter
    set_adapter(model, None)
    base = generate_ids(model, [prompts[1]], sp, eos_ids={2})[0]
    engine = Engine(load_model(str(tmp_path / "m"), device="cpu", dtype="float32")[0], tok, max_batch=2, max_len=64)
    engine.load_adapter("p", tmp_path / "p")
    assert [c.token_ids for c in engine.generate(prompts, sp, ["p", None])] == [want, base]
    assert want != generate_ids(model, [prompts[0]], sp, eos_ids={2})[0]  # the prefix matters
