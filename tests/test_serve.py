"""The OpenAI-compatible server: the real `openai` client against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from test_engine import NAMES, make_adapters

from loraforge.model import load_model
from loraforge.serve import Engine, ServeError
from loraforge.serve.app import create_app

KEY = "sk-test-123"
PROMPTS = ["Tell me a story", "What is 2 + 2?", "Name a colour", "Why is the sky blue?", "hello", "Count to five"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls run best on one thread


class Server:
    """uvicorn in a background thread on a socket bound beforehand (port 0: a free one)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("uvicorn did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served(tiny_folder, tmp_path_factory):
    """A server with the tiny model, adapters a0..a3 loaded, an API key and an adapters dir."""
    root = tmp_path_factory.mktemp("serve")
    adapters_dir = root / "adapters"
    model, tok = load_model(str(tiny_folder))
    dirs = make_adapters(model, adapters_dir)
    outside = make_adapters(model, root / "outside", names=["evil"])["evil"]
    (adapters_dir / "link").symlink_to(outside, target_is_directory=True)
    engine = Engine(model, tok, max_batch=8, max_len=96)
    for name, d in dirs.items():
        engine.load_adapter(name, d)
    app = create_app(engine, api_key=KEY, adapters_dir=adapters_dir)
    with Server(app) as server:
        server.engine, server.adapters_dir, server.outside = engine, adapters_dir, outside
        server.client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        server.http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        yield server
        server.http.close()


def chat(client, model, prompt, max_tokens=10, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=max_tokens, temperature=0, **kw)


def stream_chat(client, model, prompt, max_tokens=10):
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, reasons, chunks[-1].usage


def test_models_lists_the_base_and_each_adapter_with_its_parent(served):
    models = {m.id: m for m in served.client.models.list().data}
    base = served.engine.base_name
    assert set(models) == {base, *NAMES}
    assert all(models[n].parent == base for n in NAMES)
    assert getattr(models[base], "parent", None) is None


def test_chat_streamed_and_not_across_adapters(served):
    texts = {}
    for model in [served.engine.base_name, *NAMES]:
        r = chat(served.client, model, PROMPTS[0], max_tokens=10)
        text, reasons, usage = stream_chat(served.client, model, PROMPTS[0], max_tokens=10)
        assert r.object == "chat.completion" and r.model == model
        assert r.choices[0].message.role == "assistant"
        assert text == r.choices[0].message.content
        assert reasons == [r.choices[0].finish_reason]
        assert usage.completion_tokens == r.usage.completion_tokens <= 10
        assert usage.prompt_tokens == r.usage.prompt_tokens == len(served.engine.encode(
            [{"role": "user", "content": PROMPTS[0]}], True))
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        texts[model] = text
    assert len(set(texts.values())) == 5  # each adapter answers differently


def test_completions_streamed_and_not(served):
    c = served.client
    for model in ["a1", "a2"]:
        r = c.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
        chunks = list(c.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0,
                                           stream=True))
        assert r.object == "text_completion"
        assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 8
        ids = served.engine.encode("Once upon a time", False)
        by_ids = c.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
        assert by_ids.choices[0].text == r.choices[0].text and by_ids.usage.prompt_tokens == len(ids)


def test_concurrent_requests_across_adapters_match_each_alone(served):
    jobs = [(NAMES[i % 4], PROMPTS[i % len(PROMPTS)] + f" #{i}", 6 + i % 7) for i in range(24)]
    alone = [chat(served.client, m, p, n).choices[0].message.content for m, p, n in jobs]
    sizes = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            sizes.append(served.engine.metrics.snapshot()["running_batch_size"])
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: chat(served.client, *j).choices[0].message.content, jobs))
    stop.set()
    watcher.join()
    assert together == alone
    assert max(sizes) > 1  # they did share batches


def test_load_use_and_unload_an_adapter(served):
    c = served.client
    r = served.http.post("/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": "a3"})
    assert r.status_code == 200, r.text
    assert {m.id: m.parent for m in c.models.list().data}["hot"] == served.engine.base_name
    assert chat(c, "hot", "hi").choices[0].message.content == chat(c, "a3", "hi").choices[0].message.content
    # an absolute path inside the adapters dir is fine too
    r = served.http.post("/v1/load_lora_adapter", json={"lora_name": "hot2", "lora_path": str(served.adapters_dir / "a1")})
    assert r.status_code == 200, r.text
    r = served.http.post("/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": "a2"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    for name in ("hot", "hot2"):
        assert served.http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    with pytest.raises(openai.NotFoundError) as e:
        chat(c, "hot", "hi")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    r = served.http.post("/v1/unload_lora_adapter", json={"lora_name": "hot"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert {m.id for m in c.models.list().data} == {served.engine.base_name, *NAMES}


def test_unload_waits_for_requests_running_on_the_adapter(served, monkeypatch):
    assert served.http.post("/v1/load_lora_adapter", json={"lora_name": "busy", "lora_path": "a0"}).status_code == 200
    engine, real_step = served.engine, served.engine.step
    seen = {"draining_while_busy": False}

    def step():
        # Hold the batch once the request has started until the unload has begun, so it arrives mid-request.
        if engine.adapter_busy("busy") and engine.running:
            for _ in range(2000):
                try:
                    engine.resolve_model("busy")
                except ServeError:
                    seen["draining_while_busy"] = engine.adapter_busy("busy")
                    break
                time.sleep(0.005)
        return real_step()

    monkeypatch.setattr(engine, "step", step)
    with ThreadPoolExecutor(1) as pool:
        stream = served.client.chat.completions.create(
            model="busy", messages=[{"role": "user", "content": "go"}], max_tokens=30, temperature=0,
            stream=True, stream_options={"include_usage": True})
        it = iter(stream)
        next(it)  # the request is running
        unload = pool.submit(served.http.post, "/v1/unload_lora_adapter", json={"lora_name": "busy"})
        rest = list(it)
        assert unload.result().status_code == 200
    assert seen["draining_while_busy"]
    assert rest[-1].usage.completion_tokens == 30  # the running request was not cut short
    assert "busy" not in engine.adapters


@pytest.mark.parametrize("path", ["../outside/evil", "a0/../../outside/evil", "link", "/etc", "/"])
def test_load_refuses_paths_outside_the_adapters_dir(served, path):
    r = served.http.post("/v1/load_lora_adapter", json={"lora_name": "esc", "lora_path": path})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["param"] == "lora_path"
    assert "esc" not in served.engine.adapters


def test_load_of_a_missing_or_bad_folder_is_a_400(served):
    for path in ["nope", "a0/adapter_config.json", "bad\x00byte"]:
        r = served.http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["param"] == "lora_path"


def test_api_key_guards_every_v1_endpoint(served):
    anon = httpx.Client(base_url=served.url, timeout=30)
    wrong = openai.OpenAI(base_url=served.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        chat(wrong, "a0", "hi")
    for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", {}),
                               ("POST", "/v1/completions", {}), ("POST", "/v1/unload_lora_adapter", {"lora_name": "a0"}),
                               ("POST", "/v1/load_lora_adapter", {"lora_name": "k", "lora_path": "a0"})]:
        r = anon.request(method, path, json=body)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert anon.get("/health").status_code == 200
    assert "a0" in served.engine.adapters and "k" not in served.engine.adapters
    anon.close()


MALFORMED = [
    # (endpoint, raw body or JSON, status, param named in the error)
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
     400, "max_tokens"),
    ("/v1/chat/completions", {"model": "a0", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "a0"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "a0", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
     400, "temperature"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "hi"}], "temperature": 9},
     400, "temperature"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "hi"}], "top_p": 0},
     400, "top_p"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "hi"}], "seed": 2**70},
     400, "seed"),
    ("/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "hi"}], "stop": 5},
     400, "stop"),
    ("/v1/chat/completions", '{"model": "a0", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     400, "temperature"),
    ("/v1/chat/completions", "{not json", 400, None),
    ("/v1/chat/completions", "[1, 2, 3]", 400, None),
    ("/v1/chat/completions", "", 400, None),
    ("/v1/completions", {"model": "a0", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "a0", "prompt": [-5, 3]}, 400, "prompt"),
    ("/v1/completions", {"model": "a0", "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": "a0", "prompt": {"text": "hi"}}, 400, "prompt"),
    ("/v1/completions", {"model": "a0", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "a0", "prompt": "hi", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    ("/v1/completions", {"model": "a0", "prompt": "hi", "min_tokens": -1}, 400, "min_tokens"),
    ("/v1/completions", {"model": "a0", "prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/completions", {"model": "a0", "prompt": "hi " * 200}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "a.b", "lora_path": "a0"}, 400, "lora_name"),
    ("/v1/unload_lora_adapter", {}, 400, "lora_name"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), MALFORMED)
def test_bad_requests_get_openai_shaped_errors_never_500(served, path, body, status, param):
    if isinstance(body, str):
        r = served.http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = served.http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if param:
        assert param in err["message"]


def test_prompt_longer_than_the_context_is_a_400(served):
    with pytest.raises(openai.BadRequestError) as e:
        chat(served.client, "a0", "word " * 300, max_tokens=4)
    assert "maximum context length is 96" in e.value.body["message"]
    assert e.value.body["code"] == "context_length_exceeded"


def test_unknown_route_and_method_are_openai_shaped(served):
    r = served.http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = served.http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_stop_strings_and_seeded_sampling_over_http(served):
    full = chat(served.client, "a2", PROMPTS[1], max_tokens=12).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 2]
    cut = chat(served.client, "a2", PROMPTS[1], max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    kw = dict(model="a1", messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=1.0, top_p=0.95)
    a = served.client.chat.completions.create(seed=3, **kw).choices[0].message.content
    b = served.client.chat.completions.create(seed=3, **kw).choices[0].message.content
    assert a == b


def test_health_metrics_and_docs(served):
    chat(served.client, "a0", "hi", max_tokens=3)
    anon = httpx.Client(base_url=served.url, timeout=30)
    assert anon.get("/health").json() == {"status": "ok"}
    m = anon.get("/metrics", params={"format": "json"}).json()
    assert m["requests_served"] >= 1 and m["tokens_generated"] >= 3 and m["adapters_loaded"] == 4
    assert {"tokens_per_s", "queue_length", "running_batch_size"} <= set(m)
    text = anon.get("/metrics").text
    assert "# TYPE loraforge_requests_served_total counter" in text
    assert "loraforge_adapters_loaded 4" in text
    assert anon.get("/docs").status_code == 200
    spec = anon.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/load_lora_adapter",
            "/v1/unload_lora_adapter"} <= set(spec["paths"])
    anon.close()


def test_cli_serve_in_a_subprocess(tiny_folder, tmp_path):
    model, _ = load_model(str(tiny_folder))
    pirate = make_adapters(model, tmp_path, names=["pirate"])["pirate"]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraforge", "serve", "--model", str(tiny_folder), "--adapter", f"pirate={pirate}",
         "--port", str(port), "--api-key", KEY, "--max-batch", "2", "--max-model-len", "64",
         "--max-body-bytes", "2048"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(1200):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert {m.id for m in client.models.list().data} == {Path(tiny_folder).name, "pirate"}
        r = client.completions.create(model="pirate", prompt="hi", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
        big = httpx.post(url + "/v1/completions", json={"model": "pirate", "prompt": "x" * 3000},
                         headers={"Authorization": f"Bearer {KEY}"})
        assert big.status_code == 413 and "2048 bytes" in big.json()["error"]["message"]
        with pytest.raises(openai.PermissionDeniedError):  # no --adapters-dir: hot-loading is off
            client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "y"}, cast_to=object)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out  # SIGTERM: a graceful shut-down


def test_cli_serve_on_a_port_in_use_says_so(tiny_folder):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    try:
        r = subprocess.run([sys.executable, "-m", "loraforge", "serve", "--model", str(tiny_folder), "--port", str(port),
                            "--max-batch", "1", "--max-model-len", "16"],
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    finally:
        sock.close()
    assert r.returncode != 0
    assert f"could not serve on 127.0.0.1:{port}" in r.stderr and "in use" in r.stderr, r.stderr


def test_an_engine_bug_fails_its_batch_with_a_500_and_serving_goes_on(served, monkeypatch):
    engine, real_step = served.engine, served.engine.step

    def broken_step():
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "step", broken_step)
    r = served.http.post("/v1/completions", json={"model": "a0", "prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "server_error" and "boom" in r.json()["error"]["message"]
    monkeypatch.setattr(engine, "step", real_step)
    assert not engine.adapter_busy("a0") and not engine.has_unfinished()
    assert chat(served.client, "a0", "hi", max_tokens=3).usage.completion_tokens == 3
