"""The server under hostile or careless clients: bad adapter names, dropped connections, huge bodies,
loose types, fields it does not honour, errors on a kept-alive connection, and symlinks out of the
adapters directory. A real uvicorn server on 127.0.0.1 with the tiny model (see test_serve)."""

from __future__ import annotations

import pytest
from test_serve import served  # noqa: F401 - the module's server fixture (tiny model, adapters a0..a3, API key)

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
