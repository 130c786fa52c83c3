"""The exporter run as it is (`python -m exporter ...`), with the length of every full pass of the
cyclic collector written down, for the thousand-target point: exporter/memory.py bounds the
passes' share of the time, this measures how long one pass holds the interpreter at that size.

`python -m bench.gcwatch OUT -- ARGS...` runs `python -m exporter ARGS...`; each full pass (gen 2,
whoever started it: ours after a rendering, or the interpreter's own) appends "<seconds>\n" to OUT.
A hook of the interpreter's (gc.callbacks), not a change to the exporter: what runs is what ships.
"""

from __future__ import annotations

import gc
import runpy
import sys
import time
from pathlib import Path


def watch(out: Path) -> None:
    handle = open(out, "a", buffering=1)  # noqa: SIM115 - open for the process's life
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            handle.write(f"{time.perf_counter() - started[0]:.6f}\n")

    gc.callbacks.append(callback)


def passes(out: Path) -> list[float]:
    """The full passes' lengths, in seconds, as written so far."""
    if not out.exists():
        return []
    return [float(line) for line in out.read_text().split()]


if __name__ == "__main__":
    out, separator, *args = sys.argv[1:]
    assert separator == "--", "usage: python -m bench.gcwatch OUT -- EXPORTER-ARGS..."
    watch(Path(out))
    sys.argv = ["exporter", *args]
    runpy.run_module("exporter", run_name="__main__", alter_sys=True)
