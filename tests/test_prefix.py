"""Prefix tuning: parity with PEFT both ways, generation with the KV cache, training contracts, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_folder
from transformers import AutoModelForCausalLM

from loraforge.adapters import attach_adapter
from loraforge.errors import LoraForgeError
from loraforge.generate import SamplingParams, generate_ids
from loraforge.lora import LoraConfig, add_lora, delete_adapter, disable_adapter, registry, set_adapter
from loraforge.lora import trainable_report as lora_trainable_report
from loraforge.model import load_model
from loraforge.model.llama import causal_mask
from loraforge.model.loading import human
from loraforge.prefix import (
    PrefixConfig,
    add_prefix,
    load_prefix_adapter,
    prefix_adapters,
    prefix_for,
    save_prefix_adapter,
    set_trainable_prefix,
    with_active_prefix,
)
from loraforge.prefix.module import token_activations

P = 5


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def peft_model(folder, num_virtual_tokens=P, seed=0, **kw):
    """transformers' Llama with a PEFT prefix of random N(0, 1) entries (PEFT's own init, seeded)."""
    from peft import PrefixTuningConfig, get_peft_model

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    pm = get_peft_model(hf, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, **kw))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.normal_()
    return pm.eval()


def peft_load(folder, adapter_dir):
    from peft import PeftModel

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return PeftModel.from_pretrained(hf, str(adapter_dir)).eval()


def ids_and_left_padding(B=3, S=9, seed=0):
    ids = torch.randint(0, 49152, (B, S), generator=torch.Generator().manual_seed(seed))
    keep = torch.ones(B, S, dtype=torch.long)
    keep[1, :3] = 0  # row 1 left-padded by 3, row 2 by 6
    keep[2, :6] = 0
    return ids, keep


def our_logits(model, ids, keep=None):
    """Our forward set up as PEFT's plain forward: positions 0..S-1 (+P), padded keys masked."""
    kw = {"input_ids": ids}
    if keep is not None:
        S = ids.shape[1]
        kw["positions"] = torch.arange(S).expand(ids.shape[0], S)
        kw["attention_mask"] = causal_mask(S, 0, ids.device) & keep.bool()[:, None, None, :]
    with torch.no_grad():
        return model(**with_active_prefix(model, kw))


# -- PEFT parity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_peft_saved_adapter_gives_peft_logits(tmp_path, smol_folder, kv_heads):
    folder = make_tiny_folder(tmp_path / "m", smol_folder, seed=1, num_key_value_heads=kv_heads)
    pm = peft_model(folder)
    pm.save_pretrained(str(tmp_path / "peft"))
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    name = attach_adapter(model, tmp_path / "peft")
    assert registry(model).active == name == "peft"
    ids, keep = ids_and_left_padding()
    with torch.no_grad():
        theirs = pm(ids).logits
        theirs_padded = pm(ids, attention_mask=keep).logits
    close(our_logits(model, ids), theirs)
    close(our_logits(model, ids, keep), theirs_padded)
    with disable_adapter(model), pm.disable_adapter(), torch.no_grad():
        base = pm(ids).logits
        close(our_logits(model, ids), base)
    assert (theirs - base).abs().max() > 0.1  # the prefix matters


@pytest.mark.parametrize("projection", [False, True], ids=["table", "mlp"])
def test_our_saved_adapter_gives_same_logits_in_peft(tmp_path, tiny_folder, tiny, projection):
    model, _ = tiny
    torch.manual_seed(0)
    cfg = PrefixConfig(num_virtual_tokens=P, init="normal", prefix_projection=projection,
                       encoder_hidden_size=24 if projection else None)
    add_prefix(model, "mine", cfg)
    ids, keep = ids_and_left_padding(seed=1)
    ours, ours_padded = our_logits(model, ids), our_logits(model, ids, keep)
    out = save_prefix_adapter(model, "mine", tmp_path / "mine")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["task_type"] == "CAUSAL_LM"
    assert saved["prefix_projection"] is False  # the MLP is folded away
    assert (saved["num_virtual_tokens"], saved["num_layers"], saved["token_dim"], saved["num_attention_heads"],
            saved["num_transformer_submodules"]) == (P, 2, 2 * 8, 2, 1)  # token_dim = Hkv * head_dim
    assert saved["base_model_name_or_path"] == str(tiny_folder.resolve())  # as PEFT writes it: a path it can load
    pm = peft_load(tiny_folder, out)
    with torch.no_grad():
        close(pm(ids).logits, ours)
        close(pm(ids, attention_mask=keep).logits, ours_padded)
    prefix_adapters(model)["mine"].fold()  # what saving writes, done in place: the same prefix
    close(our_logits(model, ids), ours)
    # and back: the folded file reproduces the MLP's prefix in our model too
    model2, _ = load_model(str(tiny_folder), device="cpu", dtype="float32")
    load_prefix_adapter(model2, out)
    close(our_logits(model2, ids), ours)


def test_peft_projection_adapter_loads_folded(tmp_path, tiny_folder, tiny):
    """PEFT trains through its MLP but saves the folded table (config still says prefix_projection=true)."""
    pm = peft_model(tiny_folder, prefix_projection=True, encoder_hidden_size=12, seed=3)
    pm.save_pretrained(str(tmp_path / "p"))
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["prefix_projection"] is True
    model, _ = tiny
    load_prefix_adapter(model, tmp_path / "p")
    ids, _ = ids_and_left_padding(seed=2)
    with torch.no_grad():
        close(our_logits(model, ids), pm(ids).logits)


# -- generation -----------------------------------------------------------------------------------------------


def greedy_without_cache(forward, prompt, n):
    ids = torch.tensor([prompt])
    for _ in range(n):
        with torch.no_grad():
            nxt = forward(ids)[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids[0, len(prompt):].tolist()


def test_cached_greedy_equals_full_forwards_with_prefix(tmp_path, tiny_folder, tiny):
    pm = peft_model(tiny_folder, seed=4)
    pm.save_pretrained(str(tmp_path / "p"))
    model, _ = tiny
    load_prefix_adapter(model, tmp_path / "p", "p")
    prompt, n = [11, 22, 33, 44, 55, 66], 10
    params = SamplingParams(max_new_tokens=n)
    cached = generate_ids(model, [prompt], params, eos_ids=set())[0]  # the active prefix, taken by default
    assert cached == greedy_without_cache(lambda x: model(x, prefix=prefix_for(model, "p")), prompt, n)
    assert cached == greedy_without_cache(lambda x: pm(x).logits, prompt, n)  # PEFT's plain forward
    with disable_adapter(model):
        base = generate_ids(model, [prompt], params, eos_ids=set())[0]
    assert base == greedy_without_cache(lambda x: pm.get_base_model()(x).logits, prompt, n)
    assert cached != base


def test_left_padded_batch_with_prefix_equals_each_prompt_alone(tiny):
    model, _ = tiny
    torch.manual_seed(5)
    add_prefix(model, "p", PrefixConfig(num_virtual_tokens=3, init="normal"))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [42, 43], [1000, 2000, 3000, 4000]]
    params = SamplingParams(max_new_tokens=6)
    together = generate_ids(model, prompts, params, eos_ids=set())
    alone = [generate_ids(model, [q], params, eos_ids=set())[0] for q in prompts]
    assert together == alone
    with disable_adapter(model):
        assert generate_ids(model, prompts, params, eos_ids=set()) != together


def test_active_adapter_switches_between_lora_and_prefix(tiny):
    model, _ = tiny
    torch.manual_seed(6)
    add_lora(model, "lora", LoraConfig(r=4, init="gaussian"))
    for layer in model.modules():
        if hasattr(layer, "lora_B"):
            for b in layer.lora_B.values():
                torch.nn.init.normal_(b, std=0.5)
    add_prefix(model, "pre", PrefixConfig(num_virtual_tokens=3, init="normal"))
    prompt, params = [[7, 8, 9, 10]], SamplingParams(max_new_tokens=6)

    def run():
        return generate_ids(model, prompt, params, eos_ids=set())[0]

    with_prefix = run()
    set_adapter(model, "lora")
    with_lora = run()
    set_adapter(model, None)
    base = run()
    assert len({tuple(with_prefix), tuple(with_lora), tuple(base)}) == 3
    set_adapter(model, "pre")
    assert run() == with_prefix
    with disable_adapter(model):
        assert run() == base
    # one adapter row in a batch picks up its prefix too; a batch mixing it with other rows is refused
    ids_pre = torch.tensor([registry(model).names.index("pre")] * 2)
    assert generate_ids(model, prompt * 2, params, set(), adapter_ids=ids_pre) == [with_prefix] * 2
    with pytest.raises(LoraForgeError, match="mixing prefix"):
        generate_ids(model, prompt * 2, params, set(), adapter_ids=torch.tensor([-1, int(ids_pre[0])]))
    delete_adapter(model, "pre")
    assert "pre" not in prefix_adapters(model) and run() == base


def test_generate_cli_uses_prefix_adapter(tmp_path, tiny_folder, capsys):
    from loraforge.cli import main
    from loraforge.generate import generate

    pm = peft_model(tiny_folder, seed=7)
    pm.save_pretrained(str(tmp_path / "p"))
    argv = ["generate", "--model", str(tiny_folder), "--prompt", "Hello", "--max-new-tokens", "6", "--raw"]
    assert main(argv) == 0
    base = capsys.readouterr().out
    assert main(argv + ["--adapter", str(tmp_path / "p")]) == 0
    with_prefix = capsys.readouterr().out
    model, tok = load_model(str(tiny_folder), device="cpu", dtype="float32")
    load_prefix_adapter(model, tmp_path / "p")
    assert with_prefix == generate(model, tok, ["Hello"], SamplingParams(max_new_tokens=6), chat=False)[0] + "\n"
    assert with_prefix != base


# -- training -------------------------------------------------------------------------------------------------


def test_vocab_init_equals_prompting_with_those_tokens(tiny):
    model, _ = tiny
    tokens = torch.tensor([1, 300, 4000, 50, 777])
    add_prefix(model, "p", PrefixConfig(num_virtual_tokens=5, init="zero"))
    with torch.no_grad():
        prefix_adapters(model)["p"].embedding.copy_(token_activations(model, tokens))
    ids = torch.randint(0, 49152, (2, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        prompted = model(torch.cat([tokens.expand(2, -1), ids], 1))[:, 5:]
    close(our_logits(model, ids), prompted)
    add_prefix(model, "default_init", PrefixConfig(num_virtual_tokens=4))  # init "vocab" by default
    assert torch.isfinite(prefix_adapters(model)["default_init"].embedding).all()


@pytest.mark.parametrize("projection", [False, True], ids=["table", "mlp"])
def test_training_step_updates_only_the_prefix(tiny, projection):
    model, _ = tiny
    torch.manual_seed(9)
    add_prefix(model, "t", PrefixConfig(num_virtual_tokens=4, prefix_projection=projection))
    params = set_trainable_prefix(model, "t")
    cfg = model.config
    n = sum(p.numel() for p in params)
    if not projection:
        assert n == 4 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
    assert lora_trainable_report(model).startswith(f"trainable {human(n)} of")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("prefix_adapters.")}
    before = [p.detach().clone() for p in params]
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(10))
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    model.gradient_checkpointing = projection  # the prefix passes through checkpointed layers too
    losses = []
    for _ in range(3):
        loss = model(**with_active_prefix(model, {"input_ids": ids, "labels": ids}))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, params, strict=True))
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def test_packed_row_with_prefix_equals_its_examples_alone(tiny):
    """with_active_prefix moves given positions up by P and lets every token see the prefix."""
    model, _ = tiny
    torch.manual_seed(11)
    add_prefix(model, "p", PrefixConfig(num_virtual_tokens=3, init="normal"))
    a = torch.randint(0, 49152, (1, 6), generator=torch.Generator().manual_seed(12))
    b = torch.randint(0, 49152, (1, 4), generator=torch.Generator().manual_seed(13))
    doc = torch.tensor([0] * 6 + [1] * 4)
    mask = ((doc[:, None] == doc[None, :]) & torch.ones(10, 10, dtype=torch.bool).tril())[None, None]
    positions = torch.cat([torch.arange(6), torch.arange(4)])[None]
    with torch.no_grad():
        packed = model(**with_active_prefix(model, {"input_ids": torch.cat([a, b], 1), "positions": positions,
                                                    "attention_mask": mask}))
    close(packed[:, :6], our_logits(model, a))
    close(packed[:, 6:], our_logits(model, b))


def test_bf16_model_runs_fp32_prefix(tiny_folder):
    model, _ = load_model(str(tiny_folder), device="cpu", dtype="bfloat16")
    add_prefix(model, "p", PrefixConfig(num_virtual_tokens=2))
    assert prefix_adapters(model)["p"].embedding.dtype == torch.float32
    out = generate_ids(model, [[3, 4, 5]], SamplingParams(max_new_tokens=2), eos_ids=set())
    assert len(out[0]) == 2
    assert our_logits(model, torch.tensor([[3, 4, 5]])).dtype == torch.bfloat16


# -- errors ---------------------------------------------------------------------------------------------------


def untouched(model):
    return not registry(model).configs and not prefix_adapters(model) and not any(
        p.requires_grad for p in model.parameters())


def test_adapter_for_another_model_is_refused(tmp_path, smol_folder, tiny):
    other = make_tiny_folder(tmp_path / "other", smol_folder, seed=2, num_hidden_layers=3)
    peft_model(other).save_pretrained(str(tmp_path / "p"))
    model, _ = tiny
    with pytest.raises(LoraForgeError, match="num_layers=3 but this model needs 2"):
        attach_adapter(model, tmp_path / "p")
    assert untouched(model)
    # a config that lies about the shape is caught by the tensor's shape
    cfg_path = tmp_path / "p" / "adapter_config.json"
    raw = json.loads(cfg_path.read_text())
    raw.update(num_layers=2)
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(LoraForgeError, match="made for another model"):
        load_prefix_adapter(model, tmp_path / "p")
    assert untouched(model)


def test_corrupt_pickle_and_wrong_files_are_refused(tmp_path, tiny_folder, tiny):
    model, _ = tiny
    add_prefix(model, "src", PrefixConfig(num_virtual_tokens=2, init="normal"))
    good = save_prefix_adapter(model, "src", tmp_path / "good")
    delete_adapter(model, "src")
    assert untouched(model)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    pickle_only = tmp_path / "pickle"
    pickle_only.mkdir()
    (pickle_only / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (pickle_only / "adapter_model.bin").write_bytes(b"not unpickled")
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{not json")
    for path, msg in ((corrupt, "corrupt safetensors"), (pickle_only, "pickle"), (bad_json, "not valid JSON"),
                      (tmp_path / "missing", "no such adapter folder")):
        with pytest.raises(LoraForgeError, match=msg):
            attach_adapter(model, path)
        assert untouched(model)
    assert load_prefix_adapter(model, good, activate=False) == "good"
    assert registry(model).active is None
    with pytest.raises(LoraForgeError, match="already loaded"):
        load_prefix_adapter(model, good)


@pytest.mark.parametrize("kw, msg", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"num_virtual_tokens": 2.5}, "num_virtual_tokens"),
    ({"encoder_hidden_size": 8}, "prefix_projection=True"),
    ({"prefix_projection": True, "encoder_hidden_size": 0}, "encoder_hidden_size"),
    ({"init": "xavier"}, "init"),
    ({"prefix_projection": True, "init": "vocab"}, "init='vocab'"),
])
def test_config_validation(kw, msg):
    with pytest.raises(LoraForgeError, match=msg):
        PrefixConfig(**kw)


def test_name_clash_and_unknown_prefix(tiny):
    model, _ = tiny
    add_lora(model, "x", LoraConfig(r=2))
    with pytest.raises(LoraForgeError, match="already exists"):
        add_prefix(model, "x", PrefixConfig(num_virtual_tokens=2))
    with pytest.raises(LoraForgeError, match="no prefix adapter named 'x'"):
        prefix_for(model, "x")
    with pytest.raises(LoraForgeError, match="no prefix adapter"):
        save_prefix_adapter(model, "x", "/nonexistent/never-written")
    from loraforge.lora import merge_adapter

    merge_adapter(model, "x")
    with pytest.raises(LoraForgeError, match="unmerge it before activating"):
        add_prefix(model, "p", PrefixConfig(num_virtual_tokens=2))
    assert "p" not in registry(model).configs
