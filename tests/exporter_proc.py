"""Run the real exporter CLI as a subprocess and scrape it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.pgcluster import free_port


class ExporterProcess:
    """python -m exporter with a config written from a dict; stopped by stop() or at exit."""

    def __init__(self, tmp_path: Path, config: dict[str, Any], *args: str, env: dict[str, str] | None = None,
                 port: int | None = None) -> None:
        self.config_path = tmp_path / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.port = port or free_port()
        self.log_path = tmp_path / "exporter.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", f"--config.file={self.config_path}",
             f"--web.listen-address=127.0.0.1:{self.port}", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str = "/metrics", timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics_when(self, predicate: Any, timeout: float = 15.0) -> str:
        """Scrape until predicate(text) holds."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exporter exited {self.proc.returncode}: {self.log()}")
            try:
                _, last = self.get()
                if predicate(last):
                    return last
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"metrics never matched; last scrape:\n{last}\nlog:\n{self.log()}")

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Until /-/ready answers 200 (the first poll has been published)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"exporter exited {self.proc.returncode}: {self.log()}")
            try:
                if self.get("/-/ready")[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"exporter not ready; log:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for an exporter that exits by itself."""
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
