"""Adapters trained by `loraforge train` inside vLLM itself (vLLM CPU, `interop/setup_vllm.sh`): the same
greedy tokens and log-probabilities as ours, through vLLM's OpenAI server over a real socket, for an adapter
given at start (`--lora-modules`) and one loaded at run time (`/v1/load_lora_adapter`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI

from loraforge.adapters import attach_adapter
from loraforge.bench import servers
from loraforge.generate import SamplingParams, encode_prompt, generate_ids, stop_token_ids
from loraforge.lora import delete_adapter
from loraforge.model import load_model

pytestmark = pytest.mark.embedded

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["What is the capital of France?", "How do I boil an egg?", "Name three primary colours."]
NEW_TOKENS = 24
RANK = 8


def train(data: str, out: Path, seed: int) -> Path:
    """A real `loraforge train` run, a few steps at a high learning rate so the adapter moves the output."""
    r = subprocess.run([sys.executable, "-m", "loraforge", "train", str(REPO / "examples" / data), "--out", str(out),
                        "--max-steps", "3", "--batch-size", "2", "--max-len", "64", "--val-split", "0", "--lr", "5e-3", "--rank", str(RANK),
                        "--alpha", "16", "--dtype", "float32", "--seed", str(seed), "--no-progress"],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_adapters")
    return {"pirate": train("pirate.jsonl", tmp / "pirate", 0), "butler": train("butler.jsonl", tmp / "butler", 1)}


@pytest.fixture(scope="module")
def vllm_server(smol_folder, adapters, tmp_path_factory):
    """vLLM's OpenAI server on the embedded model with the pirate adapter; the base URL."""
    if not servers.vllm_python().exists():
        pytest.fail(f"{servers.vllm_python()} is missing: run interop/setup.sh (make test-interop does) first")
    port = servers.free_port()
    log = tmp_path_factory.mktemp("vllm_log") / "server.log"
    cmd = servers.vllm_command(smol_folder, port, {"pirate": adapters["pirate"]}, max_rank=RANK, max_loras=2)
    try:
        with servers.running("vLLM", cmd, port, log, env=servers.vllm_env()) as base:
            yield base
    except RuntimeError as e:  # start-up failed: the server's log says why
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def ours(smol_folder):
    model, tok = load_model(str(smol_folder), device="cpu", dtype="float32")
    return model, tok


def our_greedy(model, tok, adapter: Path, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Our greedy tokens (generate_ids, as `loraforge generate` runs it) and, from one forward pass over
    prompt + tokens, each token's log-probability."""
    name = attach_adapter(model, adapter, name="under_test")
    try:
        params = SamplingParams(max_new_tokens=NEW_TOKENS)
        new = generate_ids(model, [prompt], params, stop_token_ids(model, tok))[0]
        with torch.no_grad():
            ids = torch.tensor([prompt + new])  # [1, P + N]
            logits = model(ids)  # [1, P + N, V]
        logp = torch.log_softmax(logits[0, len(prompt) - 1:-1].double(), -1)  # [N, V]: position i predicts token i
        return new, logp.gather(1, torch.tensor(new)[:, None])[:, 0].tolist()
    finally:
        delete_adapter(model, name)


def vllm_greedy(client: OpenAI, model: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, logprobs=1,
                                  extra_body={"return_tokens_as_token_ids": True, "skip_special_tokens": False})
    lp = r.choices[0].logprobs
    return [int(t.removeprefix("token_id:")) for t in lp.tokens], list(lp.token_logprobs)


def check_same(client, ours_, model_name: str, adapter: Path) -> list[list[int]]:
    model, tok = ours_
    outputs = []
    for q in QUESTIONS:
        prompt = encode_prompt(tok, q)
        our_ids, our_lp = our_greedy(model, tok, adapter, prompt)
        their_ids, their_lp = vllm_greedy(client, model_name, prompt)
        assert their_ids == our_ids, (q, tok.decode(our_ids), tok.decode(their_ids))
        torch.testing.assert_close(torch.tensor(their_lp, dtype=torch.float64), torch.tensor(our_lp, dtype=torch.float64),
                                   atol=1e-3, rtol=0)
        outputs.append(our_ids)
    return outputs


def test_adapter_given_at_start_matches_ours(vllm_server, ours, adapters):
    client = OpenAI(base_url=f"{vllm_server}/v1", api_key="unused")
    assert {"base", "pirate"} <= {m.id for m in client.models.list().data}
    with_adapter = check_same(client, ours, "pirate", adapters["pirate"])
    # the adapter moves vLLM's output: the base model answers otherwise
    model, tok = ours
    base = [vllm_greedy(client, "base", encode_prompt(tok, q))[0] for q in QUESTIONS]
    assert base != with_adapter


def test_chat_endpoint_uses_the_same_template(vllm_server, adapters):
    """vLLM renders the folder's chat template itself: its chat reply is `loraforge generate`'s text."""
    client = OpenAI(base_url=f"{vllm_server}/v1", api_key="unused")
    q = QUESTIONS[0]
    theirs = client.chat.completions.create(model="pirate", messages=[{"role": "user", "content": q}],
                                            max_tokens=NEW_TOKENS, temperature=0).choices[0].message.content
    r = subprocess.run([sys.executable, "-m", "loraforge", "generate", "--prompt", q, "--adapter",
                        str(adapters["pirate"]), "--max-new-tokens", str(NEW_TOKENS), "--dtype", "float32"],
                       check=True, capture_output=True, text=True, timeout=600)
    assert theirs == r.stdout.rstrip("\n")


def test_adapter_loaded_at_run_time_matches_ours(vllm_server, ours, adapters):
    r = httpx.post(f"{vllm_server}/v1/load_lora_adapter", timeout=300,
                   json={"lora_name": "butler", "lora_path": str(adapters["butler"])})
    assert r.status_code == 200, r.text
    client = OpenAI(base_url=f"{vllm_server}/v1", api_key="unused")
    assert "butler" in {m.id for m in client.models.list().data}
    butler = check_same(client, ours, "butler", adapters["butler"])
    pirate = [vllm_greedy(client, "pirate", encode_prompt(ours[1], q))[0] for q in QUESTIONS]
    assert butler != pirate
