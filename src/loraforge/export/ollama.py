"""An Ollama model folder: ``Modelfile`` + ``base.gguf`` + ``adapter.gguf``, for ``ollama create NAME -f DIR/Modelfile``.

Ollama formats chats with a Go template (TEMPLATE), not the Jinja chat template a Hugging Face tokenizer
carries, so we map the chat formats we recognise onto fixed Go templates: ChatML (SmolLM2, Qwen) and
Llama 3. A chat template we do not recognise is refused rather than guessed: a wrong template gives a model
that answers off-format without any error.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from torch import nn

from ..errors import LoraForgeError
from ..paths import atomic_dir, atomic_write_text
from .gguf_adapter import write_adapter_gguf
from .gguf_model import write_model_gguf
from .gguf_vocab import source_gguf

log = logging.getLogger("loraforge")

CHATML = (
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n',
    ["<|im_start|>", "<|im_end|>"],
)
LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
)


def ollama_template(chat_template: str | None) -> tuple[str, list[str], str | None]:
    """(Go TEMPLATE, stop strings, default system prompt or None) for a Jinja chat template."""
    if not chat_template:
        raise LoraForgeError("the tokenizer has no chat template, so there is no TEMPLATE to write for Ollama")
    if "<|im_start|>" in chat_template and "<|im_end|>" in chat_template:
        template, stops = CHATML
        # SmolLM2 / Qwen add a fixed system message when the chat has none; Ollama's SYSTEM does the same.
        m = re.search(r"<\|im_start\|>system\n([^<{}\\]+?)<\|im_end\|>", chat_template)
        return template, stops, (m.group(1) if m else None)
    if "<|start_header_id|>" in chat_template and "<|eot_id|>" in chat_template:
        return (*LLAMA3, None)
    raise LoraForgeError("the model's chat template is neither ChatML nor Llama 3, the formats loraforge maps to "
                         "an Ollama TEMPLATE; write the Modelfile's TEMPLATE by hand")


def modelfile(template: str, stops: list[str], system: str | None) -> str:
    lines = [
        "# Written by `loraforge export --to ollama`. Create the model with:",
        "#   ollama create NAME -f Modelfile",
        "FROM ./base.gguf",
        "ADAPTER ./adapter.gguf",
        f'TEMPLATE """{template}"""',
    ]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def _place_base(src: Path, dest: Path) -> None:
    """The base GGUF into the folder: a hard link where the file system allows it, else a copy."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def write_ollama_dir(model: nn.Module, tokenizer, adapter: str, out: str | Path) -> Path:
    """Write the Ollama folder `out` (atomically): the base as GGUF, the adapter as GGUF, the Modelfile."""
    template, stops, system = ollama_template(getattr(tokenizer, "chat_template", None))
    for text in (template, system or ""):
        if '"""' in text:
            raise LoraForgeError('the chat template contains """, which a Modelfile cannot quote')
    out = Path(out)
    original = source_gguf(getattr(model, "source_folder", None))
    with atomic_dir(out) as tmp:
        write_adapter_gguf(model, adapter, tmp / "adapter.gguf", base_name=out.name)
        if original is not None:
            _place_base(original, tmp / "base.gguf")  # the very file the model was read from
        else:
            write_model_gguf(model, tmp / "base.gguf", adapter=None, outtype="f16")
        atomic_write_text(tmp / "Modelfile", modelfile(template, stops, system))
    return out
