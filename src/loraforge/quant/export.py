"""Write a pre-quantized copy of a model folder (`loraforge quantize`), one tensor at a time.

The copy loads without re-quantizing (`load_model` reads the codes as they are) and gives exactly
the outputs of quantizing on load, because both quantize the same float tensors with the same code.
NF4 / FP4 folders are also what transformers + bitsandbytes read (checkpoint.py has the layout), except
for MoE models: their experts are quantized too, one weight per expert as QLoRA quantizes them on load,
which transformers + bitsandbytes cannot read (they keep experts in full precision), so such a folder
names loraforge as its quantization method and transformers refuses it.
"""

import contextlib
import logging
import shutil
from pathlib import Path

import torch

from loraforge.errors import LoraForgeError
from loraforge.quant.checkpoint import (
    QuantSpec,
    quantization_config,
    quantize_weight,
    spec_from_config,
    stored_quantized,
)
from loraforge.quant.linear import linear_names
from loraforge.quant.serialize import state_to_tensors

log = logging.getLogger("loraforge")


def write_quantized_model(
    src: str | None,
    out_dir: str | Path,
    spec: QuantSpec = QuantSpec(),
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Quantize every linear weight but lm_head of model `src` and write the folder `out_dir` atomically.

    The other tensors (embeddings, norms, lm_head, biases) are copied as they are, or cast to `dtype`
    when given. Weights are quantized from their stored dtype (or `dtype`) on `device` (default: cuda
    if available; CPU and CUDA give the same codes, while the double-quantization offset, a mean, may
    differ in its last bit). Only the quantized model is held in memory, plus one float tensor at a time.
    `out_dir` must be a new or empty folder unless `overwrite` (paths.check_output_dir), and never the
    model's own folder.
    """
    from loraforge.model.decoder import CausalLM
    from loraforge.model.experts_io import expert_part, stack_experts
    from loraforge.model.loading import (
        WeightReader,
        load_tokenizer,
        read_config,
        resolve_source,
        weight_files,
    )
    from loraforge.paths import atomic_dir, atomic_write_json, check_output_dir, save_safetensors

    check_output_dir(out_dir, overwrite=overwrite, inputs=[src] if src else [])
    source = resolve_source(src)
    check_output_dir(out_dir, overwrite=overwrite, inputs=[source.folder])
    cfg = read_config(source.folder)
    if spec_from_config(cfg.hf_config, str(source.folder / "config.json")) is not None:
        raise LoraForgeError(f"{source.folder}: already quantized; quantize the full-precision model instead")
    with torch.device("meta"):
        model = CausalLM(cfg)
    shapes = {f"{n}.weight": tuple(model.get_submodule(n).weight.shape) for n in linear_names(model)}
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tensors: dict[str, torch.Tensor] = {}
    float_dtypes: set[torch.dtype] = set()
    # MoE: each layer's per-expert weights, stacked and quantized as QLoRA on load does once the layer is whole
    experts: dict[str, dict] = {}
    stacked = {n: tuple(p.shape) for n, p in model.named_parameters() if ".experts." in n}
    with contextlib.ExitStack() as stack:
        reader = WeightReader(weight_files(source.folder), stack)
        if stored_quantized(reader.file_of):
            raise LoraForgeError(
                f"{source.folder}: the weights are already quantized; quantize the full-precision model"
            )
        missing = sorted(set(shapes) - set(reader.file_of))
        if missing:
            raise LoraForgeError(
                f"{source.folder}: weights missing from the checkpoint: {', '.join(missing[:3])}"
            )
        for key, file in reader.file_of.items():
            if key.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and key == "lm_head.weight"):
                continue
            part = expert_part(key) if cfg.num_experts else None
            # weights to quantize are copied out and dropped (see WeightReader.read); the rest is kept
            t = reader.read(key) if key in shapes or part else reader.get(key)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if part is not None:
                layer = experts.setdefault(part[0], {})
                layer[part] = t
                if len(layer) == 3 * cfg.num_experts:
                    tensors.update(_quantized_experts(stack_experts(experts.pop(part[0]), cfg.num_experts,
                                                                    str(file)), stacked, spec, dev, file))
                continue
            if key not in shapes:
                tensors[key] = t
                if t.is_floating_point():
                    float_dtypes.add(t.dtype)
                continue
            if tuple(t.shape) != shapes[key]:
                raise LoraForgeError(
                    f"{file}: tensor {key} has shape {tuple(t.shape)}, config.json implies {shapes[key]}"
                )
            state = quantize_weight(t.to(dev), spec)
            tensors.update({k: v.cpu() for k, v in state_to_tensors(state, key).items()})
    if experts:  # a layer with some experts' weights missing: stack_experts names the first
        stack_experts(next(iter(experts.values())), cfg.num_experts, str(source.folder))
    compute_dtype = dtype or (float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32)
    config = dict(cfg.hf_config)
    # MoE experts stored quantized are loraforge's layout (model/experts_io.py): transformers must refuse it
    config["quantization_config"] = quantization_config(spec, compute_dtype, own=bool(cfg.num_experts))
    if dtype is not None:
        config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    tokenizer = load_tokenizer(source.folder)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", config)
        if (source.folder / "generation_config.json").exists():
            shutil.copy(source.folder / "generation_config.json", tmp / "generation_config.json")
        tokenizer.save_pretrained(str(tmp))
        # adapters trained on the copy still name the model they were made for
        atomic_write_json(
            tmp / "loraforge_source.json",
            {
                "name": source.name,
                "quantized_from": str(source.folder),
                "quant_type": spec.quant_type,
            },
        )
    return out_dir


def _quantized_experts(weights: dict[str, torch.Tensor], shapes: dict[str, tuple], spec: QuantSpec, dev,
                       file) -> dict[str, torch.Tensor]:
    """One layer's stacked expert weights ({...mlp.experts.gate_up_proj: [E, out, in]}) as the serialized
    quantized weight of each expert, ``...mlp.experts.gate_up_proj.e.weight`` (model/experts_io.py)."""
    out = {}
    for name, w in weights.items():
        if tuple(w.shape) != shapes.get(name):
            raise LoraForgeError(f"{file}: the experts of {name} stack to {tuple(w.shape)}, config.json implies "
                                 f"{shapes.get(name)}")
        for e in range(w.shape[0]):
            state = quantize_weight(w[e].to(dev), spec)
            out.update({k: v.cpu() for k, v in state_to_tensors(state, f"{name}.{e}.weight").items()})
    return out


__all__ = ["write_quantized_model"]
