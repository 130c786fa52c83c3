"""What users deploy: the Dockerfile, the Helm chart, the alert rules and the dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from exporter.cli import DEFAULT_PORT
from tests.exporter_proc import ExporterProcess
from tests.metrics_util import parse

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "pg-advisory-lock-exporter"
RULES = ROOT / "alerts" / "pg-advisory-lock-exporter.rules.yml"
DASHBOARD = ROOT / "dashboards" / "pg-advisory-lock-exporter.json"
BIN = Path(sys.executable).parent


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: `make tools` unpacks Debian's prometheus into the project's cache (tools/fetch.py)")
    return path


# -- Dockerfile ---------------------------------------------------------------------------

def test_dockerfile_lints_clean() -> None:
    result = subprocess.run([str(BIN / "hadolint"), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout


def test_dockerfile_matches_the_chart_and_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    config_path = re.search(r"PG_ADVISORY_LOCK_EXPORTER_CONFIG_FILE=(\S+)", text).group(1)
    assert f"COPY config.yaml {config_path}" in text
    assert re.search(rf"^EXPOSE {DEFAULT_PORT}$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["pg-advisory-lock-exporter"\]$', text, re.M)
    assert re.search(r"^USER \d+:\d+$", text, re.M)  # numeric, non-root
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert f"--config.file={config_path}" in deployment
    assert f"mountPath: {str(Path(config_path).parent)}" in deployment
    assert yaml.safe_load((CHART / "values.yaml").read_text())["service"]["port"] == DEFAULT_PORT


def test_the_wheel_carries_the_entrypoint(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("pg_advisory_lock_exporter-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        assert "pg-advisory-lock-exporter = exporter.cli:main" in archive.read(entry_points).decode()
        assert "exporter/__main__.py" in archive.namelist()


# -- Helm chart ---------------------------------------------------------------------------

try:
    import helm_python as helm
except ImportError:  # only the Helm tests need it: the Dockerfile and promtool tests still run
    helm = None


@pytest.fixture(autouse=True)
def _helm_for_chart_tests(request: pytest.FixtureRequest) -> None:
    if helm is None and request.node.get_closest_marker("helm"):
        pytest.skip("helm-python-sdk is not installed (pip install -e '.[test]')")
ALL_ON = {
    "dsn": {"existingSecret": "app-db", "secretKey": "uri"},
    "config": {"poll_interval": "2s", "unnamed_max_hold": "1h", "presets": ["rails"],
               "locks": [{"name": "billing-leader", "key": 4242, "probe": {"expect": "held"}},
                         {"name": "shard-7", "key": [42, 7], "max_hold": "15m"},
                         {"name": "tenants", "key": {"namespace": 42}, "max_hold": "5m"},
                         {"name": "accounts", "key": {"range": [1000000, 1999999]}}],
               "poolers": [{"name": "pgbouncer-main", "type": "pgbouncer",
                            "dsn": "postgresql://lock_exporter@pgbouncer:6432/pgbouncer"},
                           {"name": "rds-proxy", "addresses": ["10.1.2.3"], "pool_mode": "transaction"}]},
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True, "label": "grafana_dashboard", "labelValue": "1"},
    "prometheusScrapeAnnotations": True,
    "podAnnotations": {"team": "payments"},
    "extraArgs": ["--log.format=json"],
    "extraEnv": [{"name": "PGSSLMODE", "value": "verify-full"}],
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Exists"}],
    "affinity": {"nodeAffinity": {}},
    "imagePullSecrets": [{"name": "registry"}],
}


# No image is published, so the chart requires image.repository: every render gives the one a
# user would (where they pushed the image), unless a test asks for none.
PUSHED = "registry.example.com/platform/pg-advisory-lock-exporter"


def render(values: dict, *, repository: str | None = PUSHED) -> list[dict]:
    if repository is not None:
        values = {**values, "image": {"repository": repository, **values.get("image", {})}}
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values, name="locks", namespace="monitoring")
    docs = []
    for name, text in manifests.items():
        if name.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {d["kind"]: d for d in docs}


REQUIRED = {
    ("apps/v1", "Deployment"): ["spec.selector.matchLabels", "spec.template.spec.containers"],
    ("apps/v1", "StatefulSet"): ["spec.selector.matchLabels", "spec.template.spec.containers", "spec.serviceName"],
    ("monitoring.coreos.com/v1alpha1", "ScrapeConfig"): ["spec.httpSDConfigs"],
    ("v1", "Service"): ["spec.ports", "spec.selector"],
    ("v1", "ConfigMap"): ["data"],
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["spec.selector", "spec.endpoints"],
    ("monitoring.coreos.com/v1", "PrometheusRule"): ["spec.groups"],
}


def check_objects(docs: list[dict]) -> None:
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        assert key in REQUIRED, key
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]["name"]
        for path in REQUIRED[key]:
            node = doc
            for part in path.split("."):
                node = node[part]
            assert node, (key, path)


@pytest.mark.helm
def test_chart_lints() -> None:
    result = helm.lint(str(CHART), {"image": {"repository": PUSHED}})
    assert not result["errors"], result


@pytest.mark.helm
def test_without_image_repository_the_install_says_to_set_it() -> None:
    """The chart's image is not published: with no image.repository the install stops with one
    line that says what to set and where the README tells how, never a pull of an image that
    does not exist."""
    with pytest.raises(helm.HelmError) as info:
        render({}, repository=None)
    assert "image.repository: set it to where you pushed the image (chart README: Build the image)" in str(info.value)


@pytest.mark.helm
def test_the_image_is_the_pushed_one_at_the_exporters_version() -> None:
    from exporter import __version__

    container = by_kind(render({}))["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"{PUSHED}:{__version__}"
    container = by_kind(render({"image": {"tag": "2.0.0-rc1"}}))["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"{PUSHED}:2.0.0-rc1"


@pytest.mark.helm
def test_chart_renders_with_defaults() -> None:
    docs = render({})
    check_objects(docs)
    kinds = by_kind(docs)
    assert set(kinds) == {"Deployment", "Service", "ConfigMap"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"] == {
        "runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["runAsUser"] == 65532
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "pg-advisory-lock-exporter", "key": "dsn"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    config = yaml.safe_load(kinds["ConfigMap"]["data"]["config.yaml"])
    assert config["dsn"] == "${PG_ADVISORY_LOCK_DSN}"  # never inline


@pytest.mark.helm
def test_chart_renders_with_every_part_on(tmp_path: Path) -> None:
    docs = render(ALL_ON)
    check_objects(docs)
    kinds = [d["kind"] for d in docs]
    assert sorted(kinds) == ["ConfigMap", "ConfigMap", "Deployment", "PrometheusRule", "Service", "ServiceMonitor"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["team"] == "payments"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--log.format=json" in container["args"]
    assert {"name": "PGSSLMODE", "value": "verify-full"} in container["env"]
    assert deployment["spec"]["template"]["spec"]["tolerations"][0]["key"] == "dedicated"
    # The rendered config is one the exporter accepts.
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d["data"])
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    check = subprocess.run([sys.executable, "-m", "exporter", "--check-config", f"--config.file={path}"],
                           capture_output=True, text=True, env={"PG_ADVISORY_LOCK_DSN": "host=db", "PATH": "/usr/bin:/bin"})
    assert check.returncode == 0, check.stderr
    assert "2 locks (1 bigint, 1 int4 pair), 2 families" in check.stdout
    # One source of truth: the PrometheusRule is the rules file.
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["pg-advisory-lock-exporter.json"]) == json.loads(DASHBOARD.read_text())
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"


@pytest.mark.helm
def test_a_config_change_rolls_the_pod() -> None:
    def checksum(values: dict) -> str:
        deployment = by_kind(render(values))["Deployment"]
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    base = {"config": {"locks": [{"name": "a", "key": 1}]}}
    assert checksum(base) == checksum(base)
    assert checksum(base) != checksum({"config": {"locks": [{"name": "a", "key": 2}]}})


@pytest.mark.helm
@pytest.mark.parametrize(
    "values, message",
    [
        ({"dsn": {"existingSecret": ""}}, "/dsn/existingSecret"),
        ({"service": {"port": "http"}}, "/service/port"),
        ({"replicas": 2}, "replicas"),
        ({"config": {"dsn": "postgresql://u:p@db/app"}}, "/config"),
        ({"config": {"locks": [{"name": "a", "key": 1, "probe": {"expect": "maybe"}}]}}, "/config/locks/0/probe/expect"),
        ({"config": {"poll_interval": "5"}}, "/config/poll_interval"),
        ({"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled"),
        ({"sharding": {"enabled": True, "shards": 0}}, "/sharding/shards"),
        ({"sharding": {"shard": 1}}, "shard"),
    ],
)
def test_bad_values_are_rejected_by_the_schema(values: dict, message: str) -> None:
    with pytest.raises(helm.HelmError) as info:
        render(values)
    assert message in str(info.value)


# -- alert rules --------------------------------------------------------------------------

def test_alert_rules_check_clean() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 15 rules found" in result.stdout


def test_alert_rules_unit_tests() -> None:
    result = subprocess.run([promtool(), "test", "rules", "tests.yml"], capture_output=True, text=True, cwd=ROOT / "alerts")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_has_a_firing_and_a_quiet_case() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    cases = [c for t in yaml.safe_load((ROOT / "alerts" / "tests.yml").read_text())["tests"] for c in t["alert_rule_test"]]
    for alert in alerts:
        assert any(c["alertname"] == alert and c["exp_alerts"] for c in cases), alert
        assert any(c["alertname"] == alert and not c["exp_alerts"] for c in cases), alert
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert rule["annotations"]["runbook_url"]  # its section of docs/runbooks.md: tests/test_runbooks.py


def _minutes(duration: str) -> int:
    """A promtool eval_time ('5m', '1h1m', '1d') in minutes."""
    units = {"d": 1440, "h": 60, "m": 1}
    parts = re.findall(r"(\d+)([dhm])", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def test_every_rule_has_a_case_at_the_first_minute_it_fires_and_one_evaluation_before() -> None:
    """Issue 28: WaitersPilingUp said 5 minutes and fired at 10. Each rule's words are held to its
    expression and "for" by a promtool case where it fires, in the same situation as a quiet case
    one evaluation (a minute) before; the situation's comments say when it began."""
    tests = yaml.safe_load((ROOT / "alerts" / "tests.yml").read_text())
    assert tests["evaluation_interval"] == "1m"
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    bounded = set()
    for group in tests["tests"]:
        cases = {(c["alertname"], _minutes(c["eval_time"])): bool(c["exp_alerts"]) for c in group["alert_rule_test"]}
        bounded |= {name for (name, at), fires in cases.items() if fires and cases.get((name, at - 1)) is False}
    assert alerts - bounded == set()
    # And no job's name: the cases' jobs are named as users name them.
    assert "pg-advisory-lock-exporter" not in {m for m in re.findall(r'job="([^"]*)"', (ROOT / "alerts" / "tests.yml").read_text())}
    assert "job=~" not in RULES.read_text()


def test_no_chart_template_or_doc_says_the_rules_need_a_jobs_name() -> None:
    """The rules know the exporter by its own series (build_info, total_shards): a comment or a
    page that says they find it by its job's name sends a user renaming jobs for nothing."""
    files = [*(ROOT / "helm").rglob("*.yaml"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    for path in files:
        text = path.read_text()
        assert not re.search(r"job containing|job=~\S*pg-advisory-lock-exporter", text), path


# -- dashboard ----------------------------------------------------------------------------

def dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def concrete(expr: str) -> str:
    """A dashboard expression with Grafana's variables filled in, for promtool."""
    label_values = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr)
    if label_values:
        expr = label_values.group(1)
    return expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$instance", ".*") \
        .replace("$database", ".*").replace("$lock", ".*")


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": concrete(e)} for i, e in enumerate(dashboard_exprs())
    ]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_has_the_variables_and_panels() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "job", "instance", "database", "lock"]
    titles = " | ".join(p["title"] for p in board["panels"])
    for needle in ("Holders and waiters", "Hold age against max_hold", "Longest wait", "Probe", "Acquisitions",
                   "Who holds what now", "Polls succeed", "Family: keys held", "Family: oldest hold",
                   "Keys nobody named", "Blocked holders now"):
        assert needle in titles


def test_dashboard_uses_only_metrics_the_exporter_exports(server, sessions, tmp_path: Path) -> None:
    sessions.open().execute("SELECT pg_advisory_lock(4242), pg_advisory_lock(77), pg_advisory_lock(42, 1)")
    locks = [{"name": "leader", "key": 4242, "max_hold": "1m", "probe": {"expect": "held", "interval": "100ms"},
              "expect_every": "1h"},
             {"name": "tenants", "key": {"namespace": 42}, "max_hold": "1h"}]
    # A pooler known by address only (nothing is there): its series exist all the same; a console
    # nobody answers on: pooler_up 0 (the poll goes on without it).
    poolers = [{"name": "proxy", "addresses": ["192.0.2.1"], "pool_mode": "transaction"},
               {"name": "gone", "type": "pgbouncer", "dsn": "host=127.0.0.1 port=1 dbname=pgbouncer user=stats"}]
    proc = ExporterProcess(tmp_path, {"dsn": server.dsn(), "poll_interval": "200ms", "locks": locks,
                                      "unnamed_max_hold": "1h", "poolers": poolers})
    try:
        text = proc.metrics_when(lambda t: ("pg_advisory_lock_probe_ok", (("database", "postgres"), ("lock", "leader"))) in parse(t)
                                 and ("pg_advisory_lock_exporter_up", ()) in parse(t) and parse(t)[("pg_advisory_lock_exporter_up", ())] == 1)
    finally:
        proc.stop()
    exported = {name for name, _ in parse(text)}
    used = {m for e in dashboard_exprs() + [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
            for m in re.findall(r"\bpg_advisory_lock_[a-z_]+", e)}
    assert used, "no metric names found"
    # A release time needs a PgBouncer console and a lock stranded on it: the family is here (its HELP),
    # its samples are in tests/test_prometheus_e2e.py, which makes every panel answer over a real PgBouncer.
    # A blocked holder's series needs a holder that waits itself: tests/test_blocked.py takes that
    # situation on a real server, and tests/test_prometheus_e2e.py has the alert and panel answer.
    needs_a_console = {"pg_advisory_lock_pooled_session_release_seconds", "pg_advisory_lock_blocked_holder_info"}
    assert all(f"# HELP {name} " in text for name in needs_a_console)
    assert used - needs_a_console <= exported, used - needs_a_console - exported
