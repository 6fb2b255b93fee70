"""bench/soak.py, briefly: concurrent mixed traffic with malformed requests against a real server on
loopback gets no 5xx, no connection errors and every bad request its 4xx (the 5-minute figures are in
bench/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytest.importorskip("uvicorn")


def test_short_soak_has_no_server_errors(lora_pair):
    r = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), "--run", str(lora_pair / "alpha"),
                        "--run", str(lora_pair / "beta"), "--seconds", "10", "--concurrency", "8",
                        "--sample-seconds", "2", "--bad-fraction", "0.3", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    kinds = {k.split(" → ")[0] for k in s["by_kind"]}
    assert s["unexpected"] == {} and set(s["by_class"]) == {"2xx", "4xx"}
    assert "valid" in kinds and len(kinds) >= 8  # most kinds of bad request were sent
    assert s["texts_classified"] > 0 and len(s["rss_samples"]) >= 4
