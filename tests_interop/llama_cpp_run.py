"""Run token ids through llama.cpp (llama-cpp-python) in a process of its own, writing the results as .npz.

Run as `python llama_cpp_run.py SPEC.json`. A malformed GGUF file crashes llama.cpp (abort, segfault)
rather than raising, so the tests start this in a subprocess and read its exit status.

SPEC: {"model": GGUF path, "lora": adapter GGUF path or null, "scale": lora scale,
       "prompts": [[token ids], ...], "new_tokens": greedy tokens to generate (0: none), "eos": [ids],
       "out": .npz path}
The .npz holds logits_<i> [len(prompt_i), vocab] (every prompt position) and greedy_<i> [<= new_tokens].
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(spec_path: str) -> None:
    from llama_cpp import Llama

    spec = json.loads(open(spec_path).read())
    kw = {}
    if spec.get("lora"):
        kw = {"lora_path": spec["lora"], "lora_scale": float(spec.get("scale", 1.0))}
    longest = max(len(p) for p in spec["prompts"]) + int(spec.get("new_tokens", 0)) + 8
    llm = Llama(model_path=spec["model"], n_ctx=max(256, longest), n_batch=512, logits_all=True, verbose=False,
                n_threads=2, seed=0, **kw)
    out = {}
    eos = set(spec.get("eos", []))
    for i, ids in enumerate(spec["prompts"]):
        llm.reset()
        llm.eval(ids)
        out[f"logits_{i}"] = np.array(llm.scores[: len(ids)], dtype=np.float32)  # [S, vocab]
        new = []
        for _ in range(int(spec.get("new_tokens", 0))):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            new.append(tok)
            if tok in eos:
                break
            llm.eval([tok])
        out[f"greedy_{i}"] = np.array(new, dtype=np.int64)
    np.savez(spec["out"], **out)


if __name__ == "__main__":
    main(sys.argv[1])
