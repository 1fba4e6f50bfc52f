"""The server under hostile or careless clients: bad adapter names, dropped connections, huge bodies,
loose types, fields it does not honour, errors on a kept-alive connection, symlinks out of the adapters
directory, NaN adapters; and what it now serves: prefix adapters, log-probabilities. A real uvicorn server
on 127.0.0.1 with the tiny model (see test_serve)."""

from __future__ import annotations

import gc
import http.client
import json
import shutil
import socket
import sys
import time

import pytest
import torch
from test_serve import KEY, served  # noqa: F401 - the module's server fixture (tiny model, adapters a0..a3, API key)
from test_serve_isolation import make_prefix_adapter, poison

from loraforge.lora import adapter_ids_for

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bad_adapter_names_are_a_400_naming_the_rule_and_loading_still_works(served):  # noqa: F811
    for name in ["_parameters", "forward", "keys", "to", "__class__"]:
        r = served.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "a0"})
        assert r.status_code == 400, (name, r.text)
        err = r.json()["error"]
        assert err["param"] == "lora_name" and "letters, digits, '-' or '_'" in err["message"]
        r = served.http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        assert r.status_code == 404, (name, r.text)
    r = served.http.post("/v1/load_lora_adapter", json={"lora_name": "late-1", "lora_path": "a0"})
    assert r.status_code == 200, r.text
    r = served.http.post("/v1/completions", json={"model": "late-1", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert served.http.post("/v1/unload_lora_adapter", json={"lora_name": "late-1"}).status_code == 200


def slow_steps(server, monkeypatch, pause: float = 0.02) -> list:
    """Make each engine step take a little longer (so a request outlives a client's disconnect) and record
    every StepOutput the loop produces."""
    engine, real_step, seen = server.engine, server.engine.step, []

    def step():
        time.sleep(pause)
        outs = real_step()
        seen.extend(outs)
        return outs

    monkeypatch.setattr(engine, "step", step)
    return seen


def wait_until(cond, what: str, limit: float = 60.0) -> None:
    for _ in range(int(limit / 0.02)):
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting until {what}")


def raw_request(port: int, path: str, body: dict) -> socket.socket:
    """Send one POST on a fresh socket and return the socket, unread."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_dropped_non_streamed_request_is_cancelled_and_counted_apart(served, monkeypatch, path):  # noqa: F811
    seen = slow_steps(served, monkeypatch)
    engine, before = served.engine, served.engine.metrics.snapshot()
    body = {"model": "a0", "max_tokens": 50, "temperature": 0}
    body |= {"prompt": "hi"} if "chat" not in path else {"messages": [{"role": "user", "content": "hi"}]}
    sock = raw_request(served.port, path, body)
    wait_until(lambda: any(o.completion_tokens >= 2 for o in seen), "the request is decoding")
    sock.close()
    wait_until(lambda: not engine.has_unfinished(), "the request has ended")
    ends = [o for o in seen if o.finish_reason is not None]
    assert len(ends) == 1 and ends[0].finish_reason == "abort" and ends[0].completion_tokens < 50
    after = engine.metrics.snapshot()
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1
    assert after["requests_failed"] == before["requests_failed"]
    assert f"loraforge_requests_cancelled_total {after['requests_cancelled']}" in served.http.get("/metrics").text
    assert not engine.adapter_busy("a0")


def test_bodies_over_the_cap_are_413_and_long_texts_400_before_tokenizing(served):  # noqa: F811
    big = {"model": "a0", "prompt": "x" * (5 * 2**20)}
    r = served.http.post("/v1/completions", json=big)
    assert r.status_code == 413 and "4194304 bytes" in r.json()["error"]["message"], r.text[:300]

    def chunks():  # no Content-Length: the cap counts what arrives
        yield b'{"model": "a0", "prompt": "'
        for _ in range(80):
            yield b"y" * 65536
        yield b'"}'

    r = served.http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    engine = served.engine
    engine.encode("warm up", False)
    limit = engine.max_len * engine._max_token_chars
    for path, body in [("/v1/completions", {"prompt": "z" * (limit + 1)}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "z" * (limit + 1)}]})]:
        r = served.http.post(path, json={"model": "a0", **body})
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text[:300]
        assert f"{limit + 1} characters" in err["message"] and f"{engine.max_len} tokens" in err["message"]
    # the server still serves, on the same connection
    assert served.http.post("/v1/completions", json={"model": "a0", "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_decoding_never_waits_for_a_prompt_being_tokenized(served):  # noqa: F811
    """Tokenizing holds only the encoder's lock: with it held (a huge prompt in the tokenizer), requests
    already tokenized (here: sent as token ids) are decoded and answered."""
    engine = served.engine
    engine.encode("warm up", False)
    with engine._enc_lock:
        r = served.http.post("/v1/completions", json={"model": "a1", "prompt": [1, 2, 3], "max_tokens": 5},
                             timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


STRICT = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": [True, False]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": "0.5"}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5},
     "presence_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 10}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": []}, "tools"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, "frobnicate"),
]


@pytest.mark.parametrize(("path", "body", "param"), STRICT)
def test_loose_types_and_unhonoured_fields_are_400s_naming_the_field(served, path, body, param):  # noqa: F811
    r = served.http.post(path, json={"model": "a0", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(param), err


def test_neutral_values_of_unimplemented_fields_are_accepted(served):  # noqa: F811
    r = served.http.post("/v1/chat/completions", json={
        "model": "a0", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                                    {"role": "user", "content": "and?"}],
        "max_tokens": 2, "temperature": 0, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0,
        "logit_bias": {}, "user": "someone"})
    assert r.status_code == 200, r.text
    r = served.http.post("/v1/completions", json={"model": "a0", "prompt": "hi", "max_tokens": 2, "echo": False,
                                                  "best_of": 1, "logprobs": None, "suffix": None})
    assert r.status_code == 200, r.text


def test_the_openapi_document_tells_the_truth(served):  # noqa: F811
    r = served.http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    spec = served.http.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for op in ops.values():
            assert "422" not in op["responses"], path
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain", "application/json"}
    assert served.http.get("/metrics").headers["content-type"].startswith("text/plain")
    r = served.http.get("/metrics", params={"format": "yaml"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "format"


def test_a_500_leaves_the_kept_alive_connection_usable(served, monkeypatch):  # noqa: F811
    def broken(_model):
        raise RuntimeError("boom")

    monkeypatch.setattr(served.engine, "resolve_model", broken)
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "a0", "prompt": "hi"}), headers=headers)
    r = conn.getresponse()
    assert r.status == 500 and json.loads(r.read())["error"]["type"] == "server_error"
    monkeypatch.undo()
    conn.request("GET", "/v1/models", headers=headers)  # the same socket
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["object"] == "list"
    conn.close()


def test_a_weights_file_symlinked_out_of_the_adapters_dir_is_refused(served):  # noqa: F811
    folder = served.adapters_dir / "sneaky"
    folder.mkdir()
    shutil.copy(served.outside / "adapter_config.json", folder / "adapter_config.json")
    (folder / "adapter_model.safetensors").symlink_to(served.outside / "adapter_model.safetensors")
    r = served.http.post("/v1/load_lora_adapter", json={"lora_name": "sneaky", "lora_path": "sneaky"})
    assert r.status_code == 403, r.text
    assert "adapter_model.safetensors is a symlink" in r.json()["error"]["message"]
    assert "sneaky" not in served.engine.adapters
    # a symlink that stays inside is fine
    inside = served.adapters_dir / "linked-inside"
    inside.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (inside / f).symlink_to(served.adapters_dir / "a0" / f)
    r = served.http.post("/v1/load_lora_adapter", json={"lora_name": "inside", "lora_path": "linked-inside"})
    assert r.status_code == 200, r.text
    assert served.http.post("/v1/unload_lora_adapter", json={"lora_name": "inside"}).status_code == 200


def test_models_and_load_errors_show_names_not_server_paths(served):  # noqa: F811
    text = served.http.get("/v1/models").text
    assert str(served.adapters_dir) not in text and "/" not in "".join(
        m.get("root") or "" for m in json.loads(text)["data"])
    (served.adapters_dir / "empty").mkdir()
    for path in ["nope", "empty"]:
        r = served.http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 400 and path in r.text and str(served.adapters_dir) not in r.text, r.text


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_big_requests_leave_no_memory_behind(served):  # noqa: F811
    """Refused by character count before tokenizing, 8 prompts of 4 MB leave ~1 MB resident; tokenized (as
    they were before the cap), ~400 MB. The bound leaves room for the rest of the process's churn."""
    body = {"model": "a0", "prompt": "hello world " * 330_000}  # 3.96 MB: under the cap, over the characters
    served.http.post("/v1/completions", json={"model": "a0", "prompt": "hi", "max_tokens": 1})
    gc.collect()
    before = rss_mb()
    for _ in range(8):
        assert served.http.post("/v1/completions", json=body).status_code == 400
    gc.collect()
    grown = rss_mb() - before
    assert grown < 64, f"{grown:.0f} MB of freed request memory stayed resident"


def test_a_prefix_adapter_is_hot_loaded_and_served(served, tiny):  # noqa: F811
    make_prefix_adapter(tiny[0], served.adapters_dir, name="pre")  # made on a copy of the served model
    r = served.http.post("/v1/load_lora_adapter", json={"lora_name": "pre", "lora_path": "pre"})
    assert r.status_code == 200, r.text
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    texts = {m: served.http.post("/v1/completions", json={"model": m, **body}).json()["choices"][0]["text"]
             for m in ["pre", served.engine.base_name]}
    assert texts["pre"] != texts[served.engine.base_name]
    assert served.http.post("/v1/unload_lora_adapter", json={"lora_name": "pre"}).status_code == 200


def test_a_request_on_a_nan_adapter_is_a_500_of_its_own(served):  # noqa: F811
    assert served.http.post("/v1/load_lora_adapter", json={"lora_name": "nan", "lora_path": "a1"}).status_code == 200
    poison(served.engine.model, "nan")  # bypassing load-time validation
    body = {"prompt": "hi", "max_tokens": 4, "temperature": 0.9, "top_p": 0.9}
    r = served.http.post("/v1/completions", json={"model": "nan", **body})
    assert r.status_code == 500 and "non-finite logits" in r.json()["error"]["message"], r.text
    assert served.http.post("/v1/completions", json={"model": "a1", **body}).status_code == 200
    assert served.http.post("/v1/unload_lora_adapter", json={"lora_name": "nan"}).status_code == 200


def greedy_reference(engine, prompt_ids: list[int], n: int, adapter: str) -> tuple[list[int], torch.Tensor]:
    """Our own forward passes, no cache: n greedy tokens and the [n, V] log-softmax each was drawn from."""
    ids, rows = list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(n):
            logits = engine.model(torch.tensor([ids]), adapter_ids=adapter_ids_for(engine.model, [adapter]))
            rows.append(torch.log_softmax(logits[0, -1].float(), -1))
            ids.append(int(rows[-1].argmax()))
    return ids[len(prompt_ids):], torch.stack(rows)


def test_logprobs_match_our_own_forward_pass(served):  # noqa: F811
    engine = served.engine
    msgs = [{"role": "user", "content": "Name a colour"}]
    r = served.client.chat.completions.create(model="a2", messages=msgs, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    ids, ref = greedy_reference(engine, engine.encode(msgs, True), len(content), "a2")
    assert [c.token for c in content] == engine.token_strings(ids)
    assert len(content) == r.usage.completion_tokens
    for step, c in enumerate(content):
        assert c.logprob == pytest.approx(float(ref[step, ids[step]]), abs=1e-4)
        top = torch.topk(ref[step], 3)
        assert [a.token for a in c.top_logprobs] == engine.token_strings(top.indices.tolist())
        assert [a.logprob for a in c.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert bytes(c.bytes) == c.token.encode()
    # completions: the legacy shape, streamed or not, the same numbers
    kw = dict(model="a1", prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    whole = served.client.completions.create(**kw).choices[0]
    parts = [ch.choices[0] for ch in served.client.completions.create(stream=True, **kw) if ch.choices]
    lp = whole.logprobs
    ids, ref = greedy_reference(engine, engine.encode("Once upon a time", False), 5, "a1")
    assert lp.tokens == engine.token_strings(ids) and "".join(lp.tokens) == whole.text
    assert lp.token_logprobs == pytest.approx([float(ref[i, t]) for i, t in enumerate(ids)], abs=1e-4)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(5)]
    assert [t for p in parts if p.logprobs for t in p.logprobs.token_logprobs] == lp.token_logprobs
    assert [t for p in parts if p.logprobs for t in p.logprobs.text_offset] == lp.text_offset
    assert all(len(d) == 2 and max(d.values()) == pytest.approx(lp.token_logprobs[i], abs=1e-5)
               for i, d in enumerate(lp.top_logprobs))  # greedy: the drawn token is the most likely
    # without the field, no log-probabilities
    assert served.client.completions.create(model="a1", prompt="hi", max_tokens=2).choices[0].logprobs is None
