"""`loraforge quantize` on MoE models: the experts are stored quantized (one weight per expert, as QLoRA
quantizes them on load), the router is not; the folder loads to exactly the model `--quantize nf4` gives,
and transformers refuses it rather than loading it with its experts missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_families import MOE, build, ids

from loraforge.model import load_model
from loraforge.quant import QuantLinear

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", MOE)
def test_quantized_moe_folder_equals_quantizing_on_load(tmp_path, smol_folder, family):
    """Through the CLI for one family (a subprocess), the API for the other."""
    from loraforge.quant.export import write_quantized_model

    build(family, tmp_path / "m", smol_folder)
    if family == "qwen3_moe":
        r = subprocess.run([sys.executable, "-m", "loraforge", "quantize", "--model", str(tmp_path / "m"), "--out",
                            str(tmp_path / "q"), "--device", "cpu"], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        assert r.returncode == 0, r.stderr[-3000:]
        assert "MoE experts are quantized too" in r.stdout + r.stderr
    else:
        write_quantized_model(str(tmp_path / "m"), tmp_path / "q", device="cpu")
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    float_experts = [k for k, t in stored.items() if ".experts." in k and t.is_floating_point()
                     and not k.endswith((".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"))]
    assert not float_experts
    assert [k for k in stored if k.endswith("gate.weight")] and all(
        stored[k].dtype == torch.float32 for k in stored if k.endswith("gate.weight"))  # routers: full precision
    pre, _ = load_model(str(tmp_path / "q"), device="cpu", dtype="float32")
    on_load, _ = load_model(str(tmp_path / "m"), device="cpu", dtype="float32", quantize="nf4")
    experts = pre.model.layers[0].mlp.experts
    assert all(isinstance(m, QuantLinear) for m in [*experts.gate_up_proj, *experts.down_proj])
    x = ids(seed=11)
    with torch.no_grad():
        assert torch.equal(pre(x), on_load(x))


def test_transformers_refuses_a_quantized_moe_folder(tmp_path, smol_folder):
    from transformers import AutoModelForCausalLM

    from loraforge.quant.export import write_quantized_model

    build("qwen3_moe", tmp_path / "m", smol_folder)
    write_quantized_model(str(tmp_path / "m"), tmp_path / "q", device="cpu")
    # quant_method "loraforge" is unknown to transformers: it reads the packed codes as float weights
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
