"""The suite's pytest-timeout settings: a test that times out fails alone, and the session goes on."""

from __future__ import annotations

import re
from pathlib import Path

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]


def test_a_timeout_fails_only_that_test(pytester):
    # the timeout settings of pyproject.toml's [tool.pytest.ini_options] (tomllib is Python 3.11+)
    ours = re.findall(r'^(timeout\w*)\s*=\s*"?(\w+)"?\s*$', (ROOT / "pyproject.toml").read_text(), re.M)
    settings = dict(ours) | {"timeout": "1"}
    assert "timeout_method" in settings
    pytester.makeini("[pytest]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
    # pytest's own work between test phases, slow as it is under load (terminal output, captured logs)
    pytester.makeconftest("import time\n\ndef pytest_runtest_logreport(report):\n"
                          "    if report.when == \"call\":\n        time.sleep(0.7)\n")
    pytester.makepyfile("import time\n\ndef test_hangs():\n    time.sleep(30)\n\n"
                        "def test_in_time():\n    time.sleep(0.5)\n\ndef test_after():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "timeout", "-p", "no:cacheprovider")
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.assert_outcomes(failed=1, passed=2)
