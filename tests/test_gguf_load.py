"""Loading GGUF model files (`--model FILE.gguf`), read as llama.cpp reads them.

- Every family, exported to GGUF by `loraforge export`, loads back as the same model: the same maths fields
  and the same logits. (transformers' own GGUF loader gets six of these families wrong, see
  model/gguf_read.py; tests_interop runs the same files in llama.cpp.)
- The embedded SmolLM2 file, written by llama.cpp's converter and stored Q4_1 / Q8_0, reads exactly as
  transformers' GGUF loader (its own dequantizers, in torch) reads it.
- A file we cannot read faithfully is refused with one error naming the tensor or header key.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_families import build

from loraforge.cli import main
from loraforge.errors import LoraForgeError
from loraforge.model import load_model, resolve_source
from loraforge.model.gguf_read import llama3_rope_factors, llama3_rope_from_factors

pytestmark = pytest.mark.usefixtures("one_thread")

# Per family, what llama.cpp can express (test_export.py refuses the rest by name). llama keeps its llama3 rope and biases; mistral and mixtral their window.
ROUNDTRIP = {
    "qwen2": dict(use_sliding_window=False),  # llama.cpp's qwen2 has no sliding window
    "qwen3": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qwen3_moe": dict(norm_topk_prob=True),
    "gemma2": dict(query_pre_attn_scalar=8, tie_word_embeddings=True),
    "gemma3_text": dict(query_pre_attn_scalar=8),
}
FAMILIES = ["llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
            "phi3", "olmo2"]
# ModelConfig fields that are not the maths (token ids come from the GGUF's tokenizer, hf_config is the dict)
NOT_MATHS = {"hf_config", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"}


def export(*args) -> int:
    return main(["export", *map(str, args)])


def maths(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_MATHS}


VOCAB = 320  # a byte-level BPE of 300 tokens (below), embedding rows to spare


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A folder with a 300-token byte-level BPE tokenizer.json, trained here: SmolLM2's 49k tokens and merges
    would make every export and conversion below parse and build a full-size vocabulary (~8 s each)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world, hello GGUF"] * 20, trainer)
    folder = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(
        str(folder))
    return folder


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exported_to_gguf_loads_back_as_the_same_model(family, tmp_path, tiny_tokenizer, home):
    build(family, tmp_path / family, tiny_tokenizer, vocab_size=VOCAB, **ROUNDTRIP.get(family, {}))
    assert export("--model", tmp_path / family, "--to", "gguf", "--outtype", "f32", "--out", tmp_path / "m.gguf") == 0
    ours, _ = load_model(str(tmp_path / family), device="cpu", dtype="float32")
    back, _ = load_model(str(tmp_path / "m.gguf"), device="cpu", dtype="float32")
    assert maths(back.config) == maths(ours.config)
    x = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x), back(x)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * a.abs().max().item())
    assert [p.name for p in home.glob("models/*")] == [next(home.glob("models/*")).name]  # one cached folder


def test_a_quantized_export_loads_within_its_quantization_error(tmp_path, tiny_tokenizer, home):
    build("gemma3_text", tmp_path / "g", tiny_tokenizer, vocab_size=VOCAB, **ROUNDTRIP["gemma3_text"])
    assert export("--model", tmp_path / "g", "--to", "gguf", "--outtype", "q8_0", "--out", tmp_path / "q.gguf") == 0
    ours, _ = load_model(str(tmp_path / "g"), device="cpu", dtype="float32")
    back, _ = load_model(str(tmp_path / "q.gguf"), device="cpu", dtype="float32")
    for name, p in ours.state_dict().items():
        q = back.state_dict()[name]
        # Q8_0: half a step of absmax/127, plus the f16 rounding of the block's scale
        assert (q - p).abs().max() <= p.abs().max() * (0.5 / 127 + 1e-3), name
    x = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(x).flatten(), back(x).flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.999 and not torch.equal(a, b)


def test_the_embedded_file_reads_as_transformers_reads_it(smol_folder):
    """llama.cpp's converter wrote this file (q/k rows permuted, Q4_1 and Q8_0 blocks): our reader and
    transformers' (torch dequantizers, its own un-permutation) agree on every tensor and every field."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from loraforge.model.embedded import embedded_gguf
    from loraforge.model.loading import read_config

    gguf = embedded_gguf()
    theirs = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ours = load_file(str(smol_folder / "model.safetensors"))
    expected = {k: v for k, v in theirs.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(ours) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=1e-6, msg=k)
    cfg = read_config(smol_folder)
    assert cfg.tie_word_embeddings and theirs.config.tie_word_embeddings
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
        assert getattr(cfg, field) == getattr(theirs.config, field), field
    assert cfg.rms_norm_eps == pytest.approx(theirs.config.rms_norm_eps, rel=1e-6)
    assert cfg.rope_theta == theirs.config.rope_parameters["rope_theta"]


# --- llama3 rope factors (llama.cpp's rope_freqs) -------------------------------------------------------------

@pytest.mark.parametrize("scaling,head_dim,theta", [
    ({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
     128, 500000.0),  # Llama 3.1 / 3.2: several frequencies in the smooth band
    ({"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
     64, 500000.0),  # Llama 3.2 1B
    ({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
     8, 10000.0),  # test_families' tiny llama: one frequency in the band
    ({"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 64.0, "original_max_position_embeddings": 2048},
     8, 10000.0),
])
def test_llama3_rope_is_recovered_from_its_factors(scaling, head_dim, theta):
    scaling = {"rope_type": "llama3", **scaling}
    factors = llama3_rope_factors(scaling, head_dim, theta)
    assert factors.min() >= 1.0 and factors.max() == scaling["factor"]
    assert llama3_rope_from_factors(factors, head_dim, theta, "f.gguf") == scaling


def test_rope_factors_that_are_no_llama3_scaling_are_refused():
    factors = np.array([1.0, 3.0, 2.0, 8.0])  # not monotone in the wavelength
    with pytest.raises(LoraForgeError, match="f.gguf: rope_freqs.weight holds per-frequency rope factors"):
        llama3_rope_from_factors(factors, 8, 10000.0, "f.gguf")


# --- files we cannot read faithfully ---------------------------------------------------------------------------

def rewrite(src, dst, *, drop=(), add=None, fields=None, drop_keys=()):
    """A copy of the GGUF file `src` without the tensors `drop` and header keys `drop_keys`, with tensors `add`
    and header `fields` (uint32) set."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = GGUFWriter(str(dst), arch)
    fields = fields or {}
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in fields or key in drop_keys:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
    for key, value in fields.items():
        w.add_uint32(key, value)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    for name, a in (add or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("llama")
    build("llama", d / "llama", tiny_tokenizer, vocab_size=VOCAB)
    assert export("--model", d / "llama", "--to", "gguf", "--outtype", "f32", "--out", d / "m.gguf") == 0
    return d / "m.gguf"


@pytest.mark.parametrize("change,named", [
    (dict(add={"rope_factors_long.weight": np.ones(4, np.float32)}), "rope_factors_long"),
    (dict(add={"blk.0.ssm_a": np.ones(4, np.float32)}), "tensors blk.0.ssm_a have no place in a llama model"),
    (dict(drop=("blk.1.ffn_down.weight",)), "no tensor 'blk.1.ffn_down.weight'"),
    (dict(fields={"llama.rope.dimension_count": 4}), "llama.rope.dimension_count = 4"),
    (dict(drop_keys=("llama.embedding_length",)), "the GGUF header has no 'llama.embedding_length'"),
    (dict(add={"rope_freqs.weight": np.array([1.0, 3.0, 2.0, 8.0], np.float32)}, drop=("rope_freqs.weight",)),
     "rope_freqs.weight holds per-frequency rope factors"),
])
def test_a_file_we_cannot_read_faithfully_is_refused_by_name(change, named, llama_gguf, tmp_path, home):
    bad = tmp_path / "bad.gguf"
    rewrite(llama_gguf, bad, **change)
    with pytest.raises(LoraForgeError) as e:
        resolve_source(str(bad))
    assert str(e.value).startswith(str(bad)) and named in str(e.value) and "\n" not in str(e.value)
    assert not list(home.glob("models/*"))  # nothing converted, nothing cached


def test_gguf_model_runs_through_the_cli(llama_gguf, tmp_path, home, capsys):
    assert main(["generate", "--model", str(llama_gguf), "--prompt", "Hello", "--max-new-tokens", "3", "--raw",
                 "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip()


def test_gemma3_windows_follow_llama_cpps_defaults(tmp_path, tiny_tokenizer, home):
    """Without a stored pattern, five of each six Gemma 3 layers slide; without a window, none does."""
    build("gemma3_text", tmp_path / "g", tiny_tokenizer, vocab_size=VOCAB, **ROUNDTRIP["gemma3_text"])
    assert export("--model", tmp_path / "g", "--to", "gguf", "--outtype", "f32", "--out", tmp_path / "g.gguf") == 0
    assert load_model(str(tmp_path / "g.gguf"), device="cpu")[0].config.layer_windows == [6, None]  # stored
    rewrite(tmp_path / "g.gguf", tmp_path / "p.gguf", drop_keys=("gemma3.attention.sliding_window_pattern",))
    assert load_model(str(tmp_path / "p.gguf"), device="cpu")[0].config.layer_windows == [6, 6]
    rewrite(tmp_path / "p.gguf", tmp_path / "n.gguf", drop_keys=("gemma3.attention.sliding_window",))
    assert load_model(str(tmp_path / "n.gguf"), device="cpu")[0].config.layer_windows == [None, None]


def test_olmo2_with_a_sliding_window_is_refused(tmp_path, tiny_tokenizer, home):
    build("olmo2", tmp_path / "o", tiny_tokenizer, vocab_size=VOCAB)
    assert export("--model", tmp_path / "o", "--to", "gguf", "--outtype", "f32", "--out", tmp_path / "o.gguf") == 0
    rewrite(tmp_path / "o.gguf", tmp_path / "w.gguf", fields={"olmo2.attention.sliding_window": 4})
    with pytest.raises(LoraForgeError, match="olmo2.attention.sliding_window is set"):
        resolve_source(str(tmp_path / "w.gguf"))
