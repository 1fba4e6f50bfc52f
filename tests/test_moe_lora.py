"""LoRA on MoE expert weights (PEFT's target_parameters) against real PEFT and transformers, on tiny seeded
Mixtral and Qwen3-MoE models in fp32: PEFT's adapter loaded by us, ours loaded by PEFT, one training step's
gradients, merge/unmerge, mixed batches, QLoRA and the merged export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapter
from safetensors.torch import load_file
from test_families import MOE, VOCAB, assert_logits_close, assert_mixed_equals_rows_alone, build, ids

from loraforge.errors import LoraForgeError
from loraforge.lora import (
    LoraConfig,
    add_lora,
    load_adapter,
    merge_adapter,
    save_adapter,
    set_adapter,
    set_trainable_params,
    unmerge_adapter,
)
from loraforge.model import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module", params=MOE)
def moe(request, tmp_path_factory, smol_folder):
    """(name, folder, transformers model) per MoE family, built once for the module."""
    folder = tmp_path_factory.mktemp(request.param) / request.param
    return request.param, folder, build(request.param, folder, smol_folder)


def fresh_hf(folder):
    """The transformers model read afresh: PEFT's forward re-registers an expert weight after its
    parametrization, which reorders the module's parameters and with them the nesting PEFT gives a later
    adapter (a model in a new process has the definition order, which saved keys assume)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def expert_layers(model):
    return [m for n, m in model.named_modules() if type(m).__name__ == "ExpertLora"]


def zero_expert_adapters(model, name):
    with torch.no_grad():
        for m in expert_layers(model):
            m.lora_B[name].zero_()


@pytest.mark.parametrize("targets", [EXPERTS, ["mlp.experts.down_proj"]], ids=["both", "down"])
def test_peft_expert_adapter_loaded_by_us_gives_peft_logits(moe, tmp_path, targets):
    """Both weights (PEFT nests them: gate_up_proj's keys get a `.base_layer`) and one alone."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    _, folder, hf = moe
    pm = get_peft_model(hf, PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=targets,
                                           init_lora_weights=False))
    try:
        pm.eval().save_pretrained(str(tmp_path / "peft"))
        x = ids(seed=2)
        with torch.no_grad():
            theirs = pm(x).logits
    finally:
        pm.unload()
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    load_adapter(model, tmp_path / "peft", "p")
    assert sorted(m.param for m in expert_layers(model)) == sorted(t.rsplit(".", 1)[-1] for t in targets * 2)
    with torch.no_grad():
        ours = model(x)
        assert_logits_close(ours, theirs)
        zero_expert_adapters(model, "p")
        assert (model(x) - ours).abs().max() > 0.1  # the expert adapters matter


@pytest.mark.parametrize("targets", [EXPERTS, ["experts.gate_up_proj"]], ids=["both", "gate_up"])
def test_our_expert_adapter_loaded_by_peft_gives_ours(moe, tmp_path, targets):
    from peft import PeftModel

    _, folder, _ = moe
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    add_lora(model, "mine", LoraConfig(r=3, alpha=5, dropout=0.0, targets=["v_proj"], target_parameters=targets))
    randomize_adapter(model, "mine", seed=3)
    save_adapter(model, "mine", tmp_path / "mine")
    saved = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == sorted("mlp.experts." + t.rsplit(".", 1)[-1] for t in targets)
    x = ids(seed=3)
    with torch.no_grad():
        ours = model(x)
    pm = PeftModel.from_pretrained(fresh_hf(folder), str(tmp_path / "mine")).eval()
    with torch.no_grad():
        assert_logits_close(ours, pm(x).logits)
    with torch.no_grad():
        zero_expert_adapters(model, "mine")
        assert (model(x) - ours).abs().max() > 0.1


def test_training_step_gradients_equal_peft(moe, tmp_path):
    """The gradients of every adapter weight (experts and q_proj) after one backward equal PEFT's."""
    from peft import PeftModel

    _, folder, _ = moe
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    add_lora(model, "t", LoraConfig(r=2, alpha=4, dropout=0.0, targets=["q_proj"], target_parameters=EXPERTS))
    randomize_adapter(model, "t", seed=4)
    save_adapter(model, "t", tmp_path / "t")
    params = set_trainable_params(model, "t")
    x = ids(seed=4)

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))

    model.train()
    loss = loss_of(model(x))
    loss.backward()
    # our gradients, written where the weights were, then saved: PEFT's key names for each of them
    with torch.no_grad():
        for p in params:
            p.copy_(p.grad)
    save_adapter(model, "t", tmp_path / "grads")
    ours = load_file(str(tmp_path / "grads" / "adapter_model.safetensors"))

    pm = PeftModel.from_pretrained(fresh_hf(folder), str(tmp_path / "t"), is_trainable=True)
    pm.train()
    their_loss = loss_of(pm(x).logits)
    their_loss.backward()
    theirs = {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    torch.testing.assert_close(loss, their_loss, rtol=1e-5, atol=1e-6)
    assert set(ours) == set(theirs) and any(".experts.base_layer.lora_A" in k for k in ours)
    for k, g in theirs.items():
        torch.testing.assert_close(ours[k], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=k)


def test_merge_and_unmerge_are_exact(moe):
    _, folder, _ = moe
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    add_lora(model, "m", LoraConfig(r=2, alpha=4, dropout=0.0, target_parameters=EXPERTS))
    randomize_adapter(model, "m", seed=5)
    x = ids(seed=5)
    with torch.no_grad():
        adapted = model(x)
        merge_adapter(model)
        stacked = model.model.layers[0].mlp.experts.base.gate_up_proj
        assert not torch.equal(stacked, before["model.layers.0.mlp.experts.gate_up_proj"])
        assert_logits_close(model(x), adapted)
        unmerge_adapter(model)
        assert_logits_close(model(x), adapted)
    after = {n.replace(".base.", "."): p for n, p in model.named_parameters() if "lora_" not in n}
    assert set(after) == set(before)
    for n, p in before.items():
        torch.testing.assert_close(after[n], p, rtol=0, atol=1e-6)


def test_mixed_batch_with_expert_adapters_equals_rows_alone(moe):
    _, folder, _ = moe
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    add_lora(model, "a", LoraConfig(r=2, alpha=4, dropout=0.0, target_parameters=EXPERTS))
    add_lora(model, "b", LoraConfig(r=3, alpha=4, dropout=0.0, targets=["q_proj"],
                                    target_parameters=["mlp.experts.down_proj"]))
    for i, a in enumerate(("a", "b")):
        randomize_adapter(model, a, seed=10 + i)
    assert_mixed_equals_rows_alone(model, ids(3, 10, seed=6), ["a", None, "b"])


def test_qlora_expert_adapter_equals_it_on_the_dequantized_experts(moe, tmp_path):
    """QLoRA quantizes the experts; an expert adapter runs on them as on their dequantized weights, trains
    (gradients reach A and B), and `merge` exports W + s*BA in full precision that transformers loads."""
    from transformers import AutoModelForCausalLM

    from loraforge.lora.merge_export import write_merged_folder

    _, folder, _ = moe
    q, _ = load_model(str(folder), device="cpu", dtype="float32", quantize="nf4")
    ref, _ = load_model(str(folder), device="cpu", dtype="float32")
    for layer_q, layer_r in zip(q.model.layers, ref.model.layers, strict=True):
        for param in ("gate_up_proj", "down_proj"):
            stacked = torch.stack([m.dequantize(torch.float32) for m in getattr(layer_q.mlp.experts, param)])
            getattr(layer_r.mlp.experts, param).data.copy_(stacked)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer_r.self_attn, name).weight.data.copy_(getattr(layer_q.self_attn, name).dequantize(torch.float32))
    for m in (q, ref):
        add_lora(m, "e", LoraConfig(r=2, alpha=4, dropout=0.0, targets=[], target_parameters=EXPERTS))
        randomize_adapter(m, "e", seed=7)
    x = ids(seed=7)
    with torch.no_grad():
        ours = q(x)
        assert_logits_close(ours, ref(x))
    params = set_trainable_params(q, "e")
    q.train()
    q(x, labels=x).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params)
    q.eval()
    write_merged_folder(q, None, tmp_path / "merged", "e")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).float().eval()
    with torch.no_grad():
        assert_logits_close(hf(x).logits, ours)


def test_merged_export_with_expert_adapter_loads_in_transformers(moe, tmp_path):
    from transformers import AutoModelForCausalLM

    from loraforge.lora.merge_export import write_merged_folder

    _, folder, _ = moe
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    add_lora(model, "e", LoraConfig(r=2, alpha=4, dropout=0.0, targets=["o_proj"], target_parameters=EXPERTS))
    randomize_adapter(model, "e", seed=8)
    x = ids(seed=8)
    with torch.no_grad():
        ours = model(x)
    write_merged_folder(model, None, tmp_path / "merged", "e")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).float().eval()
    with torch.no_grad():
        assert_logits_close(hf(x).logits, ours)


def test_expert_lora_config_errors(moe):
    _, folder, _ = moe
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    with pytest.raises(LoraForgeError, match=r"dropout must be 0 with target_parameters"):
        LoraConfig(dropout=0.05, target_parameters=EXPERTS)
    with pytest.raises(LoraForgeError, match=r"target_parameters: 'mlp.gate.weight' is the MoE router"):
        add_lora(model, "r", LoraConfig(dropout=0.0, target_parameters=["mlp.gate.weight"]))
    with pytest.raises(LoraForgeError, match=r"target_parameters: 'experts.up_proj' matches no MoE expert weight"):
        add_lora(model, "r", LoraConfig(dropout=0.0, target_parameters=["experts.up_proj"]))
    with pytest.raises(LoraForgeError, match=r"rank 33 for model.layers.0.mlp.experts.gate_up_proj is outside 1..32"):
        add_lora(model, "r", LoraConfig(r=33, dropout=0.0, targets=[], target_parameters=EXPERTS))
    assert not any("lora" in k for k in model.state_dict())  # untouched


def test_cli_merge_of_peft_expert_adapter_gives_peft_logits(tmp_path, smol_folder):
    """`loraforge merge` folds PEFT's expert adapter into a folder transformers loads with PEFT's logits, as
    a user would (one family: a subprocess)."""
    import os
    import subprocess
    import sys

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    hf = build("qwen3_moe", tmp_path / "m", smol_folder, vocab_size=49152)  # the real tokenizer's ids
    pm = get_peft_model(hf, PeftLoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS,
                                           init_lora_weights=False)).eval()
    pm.save_pretrained(str(tmp_path / "a"))
    x = torch.randint(3, 49152, (2, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        theirs = pm(x).logits

    r = subprocess.run([sys.executable, "-m", "loraforge", "merge", "--model", str(tmp_path / "m"), "--adapter",
                        str(tmp_path / "a"), "--out", str(tmp_path / "merged"), "--device", "cpu", "--dtype", "float32"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert r.returncode == 0, r.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert_logits_close(merged(x).logits, theirs)


def test_engine_serves_expert_adapters_in_one_batch(moe, tmp_path):
    """Continuous batching with two expert adapters and the base in one batch: each row's greedy tokens
    equal its adapter run alone."""
    from loraforge.generate import SamplingParams, generate_ids
    from loraforge.serve.engine import Engine

    _, folder, _ = moe
    model, tok = load_model(str(folder), device="cpu", dtype="float32")
    for i, a in enumerate(("a", "b")):
        add_lora(model, a, LoraConfig(r=2, alpha=4, dropout=0.0, targets=[], target_parameters=EXPERTS))
        randomize_adapter(model, a, seed=20 + i, std=0.3)
        save_adapter(model, a, tmp_path / a)
    engine = Engine(load_model(str(folder), device="cpu", dtype="float32")[0], tok, max_batch=3, max_len=64)
    for a in ("a", "b"):
        engine.load_adapter(a, tmp_path / a)
    sp = SamplingParams(max_new_tokens=8, min_tokens=8)
    prompts = [ids(1, L, seed=40 + L)[0].tolist() for L in (3, 7, 5)]
    names = ["a", None, "b"]
    got = [c.token_ids for c in engine.generate(prompts, sp, names)]
    alone = []
    for p, a in zip(prompts, names, strict=True):
        set_adapter(model, a)
        alone.append(generate_ids(model, [p], sp, eos_ids={2})[0])
    assert got == alone
    set_adapter(model, None)
    assert generate_ids(model, [prompts[0]], sp, eos_ids={2})[0] != alone[0]  # adapter a changes the text


def test_expert_weights_without_target_parameters_are_refused(moe, tmp_path):
    """An adapter whose config lost target_parameters: the expert tensors are named, the model untouched."""
    _, folder, _ = moe
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    add_lora(model, "e", LoraConfig(r=2, alpha=4, dropout=0.0, targets=["q_proj"], target_parameters=EXPERTS))
    save_adapter(model, "e", tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    del cfg["target_parameters"]
    (tmp_path / "e" / "adapter_config.json").write_text(json.dumps(cfg))
    fresh, _ = load_model(str(folder), device="cpu", dtype="float32")
    with pytest.raises(LoraForgeError, match=r"holds LoRA weights of MoE experts \(model.layers.0.mlp.experts.*\) "
                                             r"that adapter_config.json's target_parameters does not name"):
        load_adapter(fresh, tmp_path / "e")
    assert not any("lora" in k for k in fresh.state_dict())


def test_train_cli_trains_expert_adapters_peft_loads(tmp_path, smol_folder, capsys):
    """`loraforge train --target-parameters` trains the experts' LoRA beside q_proj's; PEFT loads the result
    onto the transformers model with our logits. Expert LoRA with dropout is refused naming the field."""
    from peft import PeftModel

    from loraforge.cli import main

    folder = tmp_path / "m"
    build("qwen3_moe", folder, smol_folder, vocab_size=49152)  # the real tokenizer's ids
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}."}) + "\n"
                            for i in range(8)))
    common = ["train", str(data), "--model", str(folder), "--device", "cpu", "--dtype", "float32", "--targets",
              "q_proj", "--target-parameters", ",".join(EXPERTS), "--rank", "2", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "bad")]) == 2
    assert "dropout" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()

    out = tmp_path / "out"
    assert main([*common, "--out", str(out), "--dropout", "0", "--max-steps", "3", "--lr", "1e-2",
                 "--batch-size", "4"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["target_parameters"] == sorted(EXPERTS)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    expert_b = [v for k, v in tensors.items() if "experts" in k and "lora_B" in k]
    assert len(expert_b) == 2 * 2 and all(b.abs().max() > 0 for b in expert_b)  # 2 layers x 2 weights, trained

    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    load_adapter(model, out, name="t")
    set_adapter(model, "t")
    x = torch.randint(3, 49152, (2, 10), generator=torch.Generator().manual_seed(4))
    pm = PeftModel.from_pretrained(fresh_hf(folder), str(out)).eval()
    with torch.no_grad():
        assert_logits_close(model(x), pm(x).logits)
