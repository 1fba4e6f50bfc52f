"""`loraforge export`: llama.cpp's adapter GGUF, merged GGUF models, the Ollama folder, and --to hf.

The files are read back with gguf's own GGUFReader and checked against our model's tensors, with the
expected llama.cpp names and the rope row order written out here rather than taken from the exporter.
(tests_interop/test_llama_cpp.py runs the files in llama.cpp itself.)
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from conftest import randomize_adapter
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from loraforge.cli import main
from loraforge.lora import LoraConfig, add_lora, save_adapter
from loraforge.lora.layer import LoraLinear
from loraforge.model import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Hugging Face module -> llama.cpp tensor, written out independently of gguf's tables.
LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
ALL = list(LLAMA_NAMES)[:7]


def gguf_name(path: str) -> str:
    _, _, i, mod = path.split(".", 3)
    return f"blk.{i}.{LLAMA_NAMES[mod]}"


def from_llama_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's interleaved q/k rows back to Hugging Face's half-split order: row 2i of a head is HF's
    row i, row 2i+1 is HF's row i + D/2."""
    d = w.shape[0] // heads
    out = torch.empty_like(w)
    for h in range(heads):
        for i in range(d // 2):
            out[h * d + i] = w[h * d + 2 * i]
            out[h * d + i + d // 2] = w[h * d + 2 * i + 1]
    return out


def read(path):
    r = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def as_torch(t) -> torch.Tensor:
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        a = np.array(t.data, dtype=np.float32)
    else:
        a = dequantize(np.array(t.data), t.tensor_type)
    return torch.from_numpy(a.reshape([int(n) for n in reversed(t.shape)]))


def export(*args) -> int:
    return main(["-q", "export", *map(str, args)])


@pytest.fixture()
def adapted(tiny, tmp_path):
    """(model, adapter folder): a random rank-4 LoRA on every projection of the tiny Llama."""
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4, alpha=8, targets=ALL))
    randomize_adapter(model, "a", seed=0, std=0.1)
    return model, save_adapter(model, "a", tmp_path / "adapter")


def lora_layers(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, LoraLinear) and "a" in m.lora_A}


def test_adapter_gguf_names_shapes_alpha_and_rope_order(adapted, tmp_path, tiny_folder):
    model, adapter = adapted
    assert export("--adapter", adapter, "--to", "gguf-adapter", "--out", tmp_path / "a.gguf") == 0
    fields, tensors = read(tmp_path / "a.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == pytest.approx(8.0)
    layers = lora_layers(model)
    assert len(tensors) == 2 * len(layers) == 2 * 7 * model.config.num_hidden_layers
    cfg = model.config
    for path, m in layers.items():
        a, b = tensors[f"{gguf_name(path)}.weight.lora_a"], tensors[f"{gguf_name(path)}.weight.lora_b"]
        A, B = m.lora_A["a"].detach(), m.lora_B["a"].detach()
        # ggml lists dimensions innermost first: A [r, in] is (in, r), as the base weight [out, in] is (in, out)
        assert list(a.shape) == [m.in_features, 4] and list(b.shape) == [4, m.out_features]
        torch.testing.assert_close(as_torch(a), A, rtol=0, atol=0)
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(path.rsplit(".", 1)[1])
        got = as_torch(b)
        if heads:
            assert not torch.equal(got, B)  # reordered ...
            got = from_llama_rope(got, heads)  # ... exactly as llama.cpp's q/k rows are
        torch.testing.assert_close(got, B, rtol=0, atol=0)


def test_rslora_alpha_gives_llama_cpps_alpha_over_r_our_scale(tiny, tmp_path):
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=16, alpha=8, use_rslora=True, targets=["q_proj"]))
    randomize_adapter(model, "a")
    save_adapter(model, "a", tmp_path / "ad")
    export("--adapter", tmp_path / "ad", "--to", "gguf-adapter", "--out", tmp_path / "a.gguf")
    fields, _ = read(tmp_path / "a.gguf")
    # llama.cpp scales by alpha' / r; rsLoRA by alpha / sqrt(r) = 8 / 4 = 2
    assert fields["adapter.lora.alpha"] / 16 == pytest.approx(8 / math.sqrt(16))


def test_rank_and_alpha_patterns_fold_each_modules_scale_into_b(tiny, tmp_path):
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                                    alpha_pattern={r"layers\.1\.self_attn\.q_proj": 24}))
    randomize_adapter(model, "a")
    save_adapter(model, "a", tmp_path / "ad")
    export("--adapter", tmp_path / "ad", "--to", "gguf-adapter", "--out", tmp_path / "a.gguf")
    fields, tensors = read(tmp_path / "a.gguf")
    alpha = fields["adapter.lora.alpha"]
    for path, m in lora_layers(model).items():
        a, b = tensors[f"{gguf_name(path)}.weight.lora_a"], tensors[f"{gguf_name(path)}.weight.lora_b"]
        A, B = as_torch(a), as_torch(b)
        if path.endswith("q_proj"):
            B = from_llama_rope(B, model.config.num_attention_heads)
        # the update llama.cpp applies, alpha' / r_module * B @ A, is ours
        r = A.shape[0]
        ours = m.scaling["a"] * m.lora_B["a"].detach() @ m.lora_A["a"].detach()
        torch.testing.assert_close(alpha / r * B @ A, ours, rtol=1e-5, atol=1e-7)
    assert {m.scaling["a"] for m in lora_layers(model).values()} == {2.0, 6.0, 4.0}  # three scales really


def test_merged_gguf_holds_our_merged_weights_and_the_tokenizer(adapted, tmp_path):
    model, adapter = adapted
    assert export("--adapter", adapter, "--to", "gguf", "--outtype", "f32", "--out", tmp_path / "m.gguf") == 0
    fields, tensors = read(tmp_path / "m.gguf")
    cfg = model.config
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == cfg.num_hidden_layers
    assert fields["llama.attention.head_count_kv"] == cfg.num_key_value_heads
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == cfg.vocab_size
    assert fields["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert "<|im_start|>" in fields["tokenizer.chat_template"] and fields["tokenizer.ggml.eos_token_id"] == 2
    sd = model.state_dict()
    expected = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
                "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            expected[f"{gguf_name(f'model.layers.{i}.{norm}')}.weight"] = sd[f"model.layers.{i}.{norm}.weight"]
    for path, m in lora_layers(model).items():
        w = m.base.weight + m.scaling["a"] * m.lora_B["a"] @ m.lora_A["a"]  # W + s BA
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(path.rsplit(".", 1)[1])
        expected[f"{gguf_name(path)}.weight"] = (w, heads)
    assert set(tensors) == set(expected)
    for name, want in expected.items():
        want, heads = want if isinstance(want, tuple) else (want, None)
        got = as_torch(tensors[name])
        torch.testing.assert_close(from_llama_rope(got, heads) if heads else got, want.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("outtype,qtype,tol", [("f16", "F16", 1e-3), ("bf16", "BF16", 8e-3), ("q8_0", "Q8_0", 1e-2)])
def test_outtypes_store_their_type_and_round_to_the_weights(adapted, tmp_path, outtype, qtype, tol):
    model, adapter = adapted
    export("--adapter", adapter, "--to", "gguf", "--outtype", outtype, "--out", tmp_path / "m.gguf")
    _, tensors = read(tmp_path / "m.gguf")
    t = tensors["blk.0.ffn_down.weight"]
    assert t.tensor_type.name == qtype and tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    m = model.get_submodule("model.layers.0.mlp.down_proj")
    want = (m.base.weight + m.scaling["a"] * m.lora_B["a"] @ m.lora_A["a"]).detach()
    torch.testing.assert_close(as_torch(t), want, rtol=0, atol=tol * want.abs().max().item())


def test_nf4_base_is_merged_dequantized_and_said_so(adapted, tmp_path, capfd):
    _, adapter = adapted
    assert export("--adapter", adapter, "--to", "gguf", "--outtype", "f32", "--quantize", "nf4",
                  "--out", tmp_path / "m.gguf") == 0
    assert "dequantized" in capfd.readouterr().err
    from loraforge.adapters import attach_adapter
    from loraforge.lora.merge_export import merged_state_dict

    model, _ = load_model(str(_tiny_base(adapter)), device="cpu", dtype="float32", quantize="nf4")
    merged, quantized = merged_state_dict(model, attach_adapter(model, adapter))
    assert quantized
    _, tensors = read(tmp_path / "m.gguf")
    torch.testing.assert_close(as_torch(tensors["blk.1.ffn_up.weight"]), merged["model.layers.1.mlp.up_proj.weight"])


def _tiny_base(adapter):
    import json

    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_plain_base_to_gguf_without_adapter(tiny_folder, tmp_path):
    assert export("--model", tiny_folder, "--to", "gguf", "--outtype", "f32", "--out", tmp_path / "b.gguf") == 0
    _, tensors = read(tmp_path / "b.gguf")
    model, _ = load_model(str(tiny_folder), device="cpu", dtype="float32")
    torch.testing.assert_close(as_torch(tensors["blk.0.ffn_up.weight"]),
                               model.state_dict()["model.layers.0.mlp.up_proj.weight"])


def test_ollama_folder_has_modelfile_base_and_adapter(adapted, tmp_path):
    _, adapter = adapted
    assert export("--adapter", adapter, "--to", "ollama", "--out", tmp_path / "oll") == 0
    text = (tmp_path / "oll" / "Modelfile").read_text()
    assert "FROM ./base.gguf" in text and "ADAPTER ./adapter.gguf" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "{{ .Content }}<|im_end|>" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text  # SmolLM2's default system turn
    assert read(tmp_path / "oll" / "adapter.gguf")[0]["general.type"] == "adapter"
    assert read(tmp_path / "oll" / "base.gguf")[0]["general.type"] == "model"


def test_unknown_chat_template_is_refused_for_ollama():
    from loraforge.errors import LoraForgeError
    from loraforge.export.ollama import ollama_template

    assert ollama_template("{{ '<|start_header_id|>' }}{{ '<|eot_id|>' }}")[1][-1] == "<|eot_id|>"
    with pytest.raises(LoraForgeError, match="neither ChatML nor Llama 3"):
        ollama_template("{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}")


def test_export_hf_writes_what_merge_writes(adapted, tmp_path):
    _, adapter = adapted
    assert export("--adapter", adapter, "--to", "hf", "--out", tmp_path / "hf") == 0
    assert main(["-q", "merge", "--adapter", str(adapter), "--model", _tiny_base(adapter),
                 "--out", str(tmp_path / "merged")]) == 0
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refusals_write_nothing(adapted, tmp_path, capsys, tiny_folder):
    from loraforge.prefix import PrefixConfig, add_prefix, save_prefix_adapter

    model, adapter = adapted
    out = tmp_path / "a.gguf"
    out.write_bytes(b"mine")
    assert export("--adapter", adapter, "--to", "gguf-adapter", "--out", out) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert export("--to", "ollama", "--out", tmp_path / "o") == 2
    assert "needs --adapter" in capsys.readouterr().err
    import json

    trained_embedding = tmp_path / "emb"
    shutil.copytree(adapter, trained_embedding)
    cfg = json.loads((trained_embedding / "adapter_config.json").read_text())
    (trained_embedding / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["embed_tokens"]}))
    assert export("--adapter", trained_embedding, "--to", "gguf-adapter", "--out", tmp_path / "e.gguf") == 2
    assert "modules_to_save" in capsys.readouterr().err
    add_prefix(model, "p", PrefixConfig(num_virtual_tokens=2))
    save_prefix_adapter(model, "p", tmp_path / "prefix")
    assert export("--adapter", tmp_path / "prefix", "--to", "gguf-adapter", "--out", tmp_path / "p.gguf") == 2
    assert "PREFIX_TUNING" in capsys.readouterr().err
    tied, _ = load_model(str(tiny_folder), device="cpu", dtype="float32")
    tied.config.tie_word_embeddings = True  # as a tied model reports it; the head is then the embedding
    add_lora(tied, "h", LoraConfig(r=2, targets=["lm_head"]))
    from loraforge.errors import LoraForgeError
    from loraforge.export.gguf_adapter import write_adapter_gguf

    with pytest.raises(LoraForgeError, match="ties to the token embedding"):
        write_adapter_gguf(tied, "h", tmp_path / "h.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "adapter", "emb", "prefix"]


# Every family: the base and an adapter read back with the architecture, tensor names and shapes llama.cpp
# expects (its adapter loader requires lora_a's first and lora_b's second dimension to match the base's).
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "qwen3_moe": "qwen3moe", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3",
             "phi3": "phi3", "olmo2": "olmo2"}
# What llama.cpp cannot read from a GGUF file is refused (test below); here the families without it.
EXPORTABLE = {"qwen3": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
              "qwen3_moe": dict(norm_topk_prob=True),
              "gemma2": dict(query_pre_attn_scalar=8, tie_word_embeddings=True), "gemma3_text": dict(query_pre_attn_scalar=8)}


def allowed_names(arch: str, n_layers: int) -> set[str]:
    import gguf

    key = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    out = set()
    for kind in gguf.MODEL_TENSORS[key]:
        for i in range(n_layers):
            out |= {gguf.TENSOR_NAMES[kind].format(bid=i) + s for s in (".weight", ".bias")}
    return out


@pytest.mark.parametrize("family", list(GGUF_ARCH))
def test_every_family_exports_llama_cpp_names_and_shapes(family, tmp_path, smol_folder):
    from test_families import build

    folder = tmp_path / family
    build(family, folder, smol_folder, vocab_size=49152, **EXPORTABLE.get(family, {}))
    assert export("--model", folder, "--to", "gguf", "--outtype", "f32", "--out", tmp_path / "m.gguf") == 0
    model, _ = load_model(str(folder), device="cpu", dtype="float32")
    arch = GGUF_ARCH[family]
    fields, tensors = read(tmp_path / "m.gguf")
    assert fields["general.architecture"] == arch and fields[f"{arch}.block_count"] == 2
    assert fields[f"{arch}.attention.head_count_kv"] == model.config.num_key_value_heads
    assert set(tensors) <= allowed_names(arch, 2), set(tensors) - allowed_names(arch, 2)
    sd = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    weights = {k: t for k, t in tensors.items() if k != "rope_freqs.weight"}  # llama3 rope's factors (llama)
    assert sum(int(np.prod(t.shape)) for t in weights.values()) == sum(v.numel() for v in sd.values())
    assert ("rope_freqs.weight" in tensors) == (family == "llama")
    if model.config.num_experts:
        assert fields[f"{arch}.expert_count"] == 4
        E, two_i, H = sd["model.layers.0.mlp.experts.gate_up_proj"].shape
        assert list(tensors["blk.0.ffn_gate_exps.weight"].shape) == [H, two_i // 2, E]
    if model.config.norm_unit_offset:  # Gemma's (1 + w), stored as llama.cpp multiplies
        torch.testing.assert_close(as_torch(tensors["output_norm.weight"]), 1 + sd["model.norm.weight"])
    attn = ["qkv_proj"] if family == "phi3" else ["q_proj", "k_proj", "v_proj"]
    add_lora(model, "a", LoraConfig(r=2, targets=[*attn, "o_proj"]))
    save_adapter(model, "a", tmp_path / "ad")
    assert export("--model", folder, "--adapter", tmp_path / "ad", "--to", "gguf-adapter",
                  "--out", tmp_path / "a.gguf") == 0
    fields, lora = read(tmp_path / "a.gguf")
    assert fields["general.architecture"] == arch and len(lora) == 2 * 2 * (len(attn) + 1)
    for name, t in lora.items():
        base = tensors[name.rsplit(".", 1)[0]]
        assert t.shape[0 if name.endswith("lora_a") else 1] == base.shape[0 if name.endswith("lora_a") else 1]


@pytest.mark.parametrize("family,field", [("qwen2", "rope_scaling 'llama3'"), ("qwen3", "rope_scaling 'yarn'"),
                                          ("gemma2", "query_pre_attn_scalar"),
                                          ("gemma", "tie_word_embeddings"), ("qwen3_moe", "norm_topk_prob")])
def test_what_llama_cpp_cannot_express_is_refused_by_name(family, field, tmp_path, smol_folder, capsys):
    from test_families import build

    # llama3 rope is written for the llama architecture only (llama.cpp's rope_freqs)
    llama3 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}
    extra = {"gemma": dict(tie_word_embeddings=False), "qwen2": llama3}.get(family, {})
    build(family, tmp_path / family, smol_folder, vocab_size=49152, **extra)
    assert export("--model", tmp_path / family, "--to", "gguf", "--out", tmp_path / "m.gguf") == 2
    assert field in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()
