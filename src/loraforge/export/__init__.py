"""Exports to the programs people deploy with: llama.cpp / Ollama (GGUF files, a Modelfile).

gguf_names.py   our families -> llama.cpp architectures, tensor names (gguf's own tables), the rope row order
gguf_adapter.py a LoRA adapter as llama.cpp's adapter GGUF
gguf_model.py   a merged (or plain) model as a GGUF model file, hyperparameters and tokenizer included
gguf_vocab.py   the tokenizer metadata (copied from the embedded GGUF, or built from tokenizer.json)
ollama.py       a Modelfile folder: base GGUF, adapter GGUF, TEMPLATE and stop tokens
"""
