"""Every manifest the chart renders, validated against the API that will receive it: core kinds
against the Kubernetes OpenAPI schemas (kubernetes-validate) of the oldest version the chart claims
and the newest it carries, ServiceMonitor and PrometheusRule against the Prometheus Operator's own
CRD schemas (the validators of @kubernetes-models/prometheus-operator, run with node)."""

from __future__ import annotations

import json
import re
import subprocess

import kubernetes_validate
import pytest
import yaml

from tests.npmpack import installed
from tests.test_deploy import ALL_ON, CHART, render

pytestmark = pytest.mark.helm

OPERATOR_MODELS = ("@kubernetes-models/prometheus-operator", "6.0.0")
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule"),
             ("monitoring.coreos.com/v1alpha1", "ScrapeConfig")}
NEWEST = kubernetes_validate.latest_version()


def oldest_claimed() -> str:
    """The lowest Kubernetes version Chart.yaml's kubeVersion admits."""
    claim = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    return re.fullmatch(r">=\s*(\d+\.\d+\.\d+)(-0)?", claim).group(1)


def sidecar_pod() -> dict:
    """The sidecar snippet of the chart's README, in the Deployment a user pastes it into."""
    text = (CHART / "README.md").read_text()
    snippet = text.split("## As a sidecar", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    spec = yaml.safe_load("\n".join(line[6:] for line in snippet.splitlines() if line.strip()))
    spec["containers"][0] = {"name": "app", "image": "example/app:1.0"}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
            "spec": {"selector": {"matchLabels": {"app": "app"}},
                     "template": {"metadata": {"labels": {"app": "app"}}, "spec": spec}}}


TARGETS_MODE = {
    "targets": {"orders": {"existingSecret": "orders-db", "secretKey": "uri"}, "billing-eu": {"existingSecret": "billing-db"}},
    "config": {"poll_interval": "5s", "targets": {
        "orders": {"presets": ["rails"], "locks": [{"name": "leader", "key": 4242}]},
        "billing-eu": {"locks": [{"name": "tenants", "key": {"namespace": 42}}], "databases": ["billing"]}}},
    "serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
}
SHARDED = {**TARGETS_MODE, "sharding": {"enabled": True, "shards": 3}}
VALUE_SETS = {
    "defaults": {},
    "targets": TARGETS_MODE,
    "sharded": SHARDED,
    "everything on": {**ALL_ON, "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
                      "dsn": {"existingSecret": "app-db", "secretKey": "uri"}},
}


def documents(name: str) -> list[dict]:
    return render(VALUE_SETS[name])


@pytest.mark.parametrize("name", list(VALUE_SETS))
@pytest.mark.parametrize("version", ["oldest", "newest"])
def test_core_objects_validate_against_the_kubernetes_api(name: str, version: str) -> None:
    wanted = oldest_claimed() if version == "oldest" else NEWEST
    core = [d for d in documents(name) if (d["apiVersion"], d["kind"]) not in CRD_KINDS]
    assert core
    for doc in core:
        kubernetes_validate.validate(doc, wanted, strict=True)


@pytest.mark.parametrize("version", ["oldest", "newest"])
def test_the_readmes_sidecar_snippet_validates(version: str) -> None:
    kubernetes_validate.validate(sidecar_pod(), oldest_claimed() if version == "oldest" else NEWEST, strict=True)


VALIDATE_CRDS = """
import * as v1 from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1';
import * as v1alpha1 from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1alpha1';
const models = {'monitoring.coreos.com/v1': v1, 'monitoring.coreos.com/v1alpha1': v1alpha1};
let input = '';
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const results = JSON.parse(input).map((doc) => {
    try { new models[doc.apiVersion][doc.kind](doc).validate(); return null; } catch (e) { return `${doc.kind}: ${e.message}`; }
  });
  console.log(JSON.stringify(results));
});
"""


def validate_crds(docs: list[dict]) -> list[str | None]:
    home = installed(*OPERATOR_MODELS)
    script = home / "validate.mjs"
    script.write_text(VALIDATE_CRDS)
    out = subprocess.run(["node", str(script)], input=json.dumps(docs), capture_output=True, text=True,
                         check=True, timeout=120, cwd=home).stdout
    return json.loads(out)


def test_service_monitor_and_prometheus_rule_validate_against_the_operators_crds() -> None:
    crds = [d for d in documents("everything on") if (d["apiVersion"], d["kind"]) in CRD_KINDS]
    assert {d["kind"] for d in crds} == {"ServiceMonitor", "PrometheusRule"}
    assert validate_crds(crds) == [None] * len(crds)
    # The validator does refuse a bad one: an interval the operator cannot parse.
    broken = json.loads(json.dumps(next(d for d in crds if d["kind"] == "ServiceMonitor")))
    broken["spec"]["endpoints"][0]["interval"] = "half a minute"
    (error,) = validate_crds([broken])
    assert error and "interval" in error


def test_the_targets_mode_scrapes_each_target_and_gives_each_its_secret(tmp_path) -> None:
    import sys

    docs = documents("targets")
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    probes = [e for e in monitor["spec"]["endpoints"] if e["path"] == "/probe"]
    assert sorted((e["params"]["target"][0], e["relabelings"][0]["replacement"]) for e in probes) == [
        ("billing-eu", "billing-eu"), ("orders", "orders")]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in next(
        d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env == {"PG_ADVISORY_LOCK_DSN_ORDERS": {"name": "orders-db", "key": "uri"},
                   "PG_ADVISORY_LOCK_DSN_BILLING_EU": {"name": "billing-db", "key": "dsn"}}
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(config)
    check = subprocess.run([sys.executable, "-m", "exporter", "--check-config", f"--config.file={path}"], capture_output=True,
                           text=True, env={"PG_ADVISORY_LOCK_DSN_ORDERS": "host=o", "PG_ADVISORY_LOCK_DSN_BILLING_EU": "host=b",
                                           "PATH": "/usr/bin:/bin"})
    assert check.returncode == 0, check.stderr
    assert check.stdout.split(": ok: ")[1].startswith("2 targets: billing-eu: ")
    assert validate_crds([monitor]) == [None]


def test_sharding_runs_a_statefulset_of_shards_and_scrapes_each_target_from_its_owner(tmp_path) -> None:
    import sys

    docs = documents("sharded")
    kinds = {d["kind"]: d for d in docs}
    assert "Deployment" not in kinds
    shards = kinds["StatefulSet"]
    service = kinds["Service"]
    assert (shards["spec"]["replicas"], shards["spec"]["serviceName"]) == (3, service["metadata"]["name"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    container = shards["spec"]["template"]["spec"]["containers"][0]
    assert {"--shard.from-pod-name", "--total-shards=3"} <= set(container["args"])
    fields = {e["name"]: e["valueFrom"].get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert (fields["POD_NAME"], fields["POD_IP"]) == ("metadata.name", "status.podIP")
    # Each shard's own /metrics through the ServiceMonitor, and no /probe there: a target is
    # scraped only from its owner, which the ScrapeConfig finds through each shard's /sd.
    monitor = kinds["ServiceMonitor"]
    assert [e["path"] for e in monitor["spec"]["endpoints"]] == ["/metrics"]
    scrape = kinds["ScrapeConfig"]["spec"]
    name = shards["metadata"]["name"]
    assert [c["url"] for c in scrape["httpSDConfigs"]] == [
        f"http://{name}-{i}.{name}.monitoring.svc.cluster.local:10105/sd" for i in range(3)]
    assert "pg-advisory-lock-exporter" in scrape["jobName"] and scrape["metricsPath"] == "/probe"
    rules = [r["alert"] for g in kinds["PrometheusRule"]["spec"]["groups"] for r in g["rules"]]
    assert "PgAdvisoryLockExporterShardMissing" in rules
    crds = [d for d in docs if (d["apiVersion"], d["kind"]) in CRD_KINDS]
    assert validate_crds(crds) == [None] * len(crds)
    broken = json.loads(json.dumps(kinds["ScrapeConfig"]))
    del broken["spec"]["httpSDConfigs"][0]["url"]
    (error,) = validate_crds([broken])
    assert error and "url" in error
    # The pod's config with a shard's flags: what --check-config says it owns.
    path = tmp_path / "config.yaml"
    path.write_text(kinds["ConfigMap"]["data"]["config.yaml"])
    check = subprocess.run([sys.executable, "-m", "exporter", "--check-config", f"--config.file={path}",
                            *container["args"][1:]], capture_output=True, text=True,
                           env={"PG_ADVISORY_LOCK_DSN_ORDERS": "host=o", "PG_ADVISORY_LOCK_DSN_BILLING_EU": "host=b",
                                "POD_NAME": f"{name}-2", "PATH": "/usr/bin:/bin"})
    assert check.returncode == 0, check.stderr
    assert f"shard 2 of 3 owns " in check.stdout


def test_sharding_without_targets_is_refused() -> None:
    with pytest.raises(Exception) as info:
        render({"sharding": {"enabled": True}})
    assert "sharding.enabled: sharding spreads targets over replicas" in str(info.value)
