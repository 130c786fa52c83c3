"""The chart's values.schema.json takes its config part from config.schema.json, the one schema of
config.yaml: `python helm/sync_schema.py` writes it; tests/test_schema.py fails if they drift.

In the chart the dsn comes from a Secret, so config may not hold one.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIG_SCHEMA = ROOT / "config.schema.json"
VALUES_SCHEMA = ROOT / "helm" / "pg-advisory-lock-exporter" / "values.schema.json"


def chart_config_schema(config_schema: dict) -> dict:
    """config.schema.json as the chart's values.config: no dsn (the chart sets it from a Secret),
    and the definitions inlined, since the chart's schema has a root of its own."""
    def inline(node: object) -> object:
        if isinstance(node, dict):
            if "$ref" in node:  # "#/definitions/lock", "#/properties/poll_interval": a pointer into this file
                target: Any = config_schema
                for part in node["$ref"].removeprefix("#/").split("/"):
                    target = target[part]
                return inline(target)
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    part = copy.deepcopy({k: v for k, v in config_schema.items() if k not in ("$schema", "$id", "title", "definitions")})
    part = inline(part)
    del part["properties"]["dsn"]
    # The chart sets each target's dsn too (targets.NAME in the values names its Secret).
    part["properties"]["targets"]["patternProperties"] = {
        pattern: {**target, "properties": {k: v for k, v in target["properties"].items() if k != "dsn"}}
        for pattern, target in part["properties"]["targets"]["patternProperties"].items()
    }
    part["description"] = "config.yaml without dsn (the chart sets it from the Secret); generated from config.schema.json"
    part["not"] = {"required": ["dsn"]}
    return part


def synced_values_schema() -> dict:
    values = json.loads(VALUES_SCHEMA.read_text())
    values["properties"]["config"] = chart_config_schema(json.loads(CONFIG_SCHEMA.read_text()))
    return values


if __name__ == "__main__":
    VALUES_SCHEMA.write_text(json.dumps(synced_values_schema(), indent=2) + "\n")
    print(f"wrote {VALUES_SCHEMA.relative_to(ROOT)}", file=sys.stderr)
