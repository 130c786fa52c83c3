"""A real Prometheus for a test: started on a config, asked through its HTTP API, stopped."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.pgcluster import free_port


@contextlib.contextmanager
def running_prometheus(tmp_path: Path, config: dict[str, Any]) -> Iterator[Callable[[str], list[dict]]]:
    """Prometheus (Debian's, unpacked by `make tools`) on `config`, its data under tmp_path; yields
    query(expr): the instant vector's results, [] while it does not answer."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: `make tools` unpacks Debian's prometheus into the project's cache (tools/fetch.py)")
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    with open(tmp_path / "prometheus.log", "wb") as log:
        prometheus = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                      stdout=log, stderr=subprocess.STDOUT)

    def query(expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())["data"]["result"]
        except OSError:
            return []

    try:
        yield query
    finally:
        prometheus.terminate()
        prometheus.wait(10)
