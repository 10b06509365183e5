"""The Grafana dashboard against a real Prometheus: Debian's `prometheus` scrapes a beat
and two workers every second while they run requests to every outcome, then every query
of deploy/grafana/bgqueue-dashboard.json (its `app` variable included) is evaluated
through Prometheus's HTTP API and must return data. tests/test_deploy.py checks that the
queries name documented metrics and labels; this checks that they select what bgqueue
really serves, as Prometheus stores it."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

import bgqueue as bg
from bgqueue.broker.embedded import free_port
from tests.apps import transient_app
from tests.harness import APP_ID, Cluster, wait_for

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "bgqueue-dashboard.json"
P = "com.bgqueue.test."
SCRAPE_INTERVAL = 1  # seconds: short, so a run of a few seconds is scraped several times
# What Grafana puts for its own variables. $__interval is what it picks for the
# dashboard's default range (6 h) on a half-width panel; $__rate_interval is
# max($__interval + scrape interval, 4 * scrape interval), with the data source's scrape
# interval set to this Prometheus's.
GRAFANA_VARIABLES = {
    "__interval": "20s",
    "__rate_interval": f"{20 + SCRAPE_INTERVAL}s",
    "__range": "6h",
}
# Labels a query may group by, and the values that must be above zero after the run:
# a panel that splits by one of them shows every outcome (reason, kind) the run made.
SHOWN = {
    "outcome": {"success", "unsuccessful", "failed", "expired"},
    "reason": {"not_due", "no_capable_worker"},
    "kind": {"processing"},
}
RUNS_AT_ZERO = "bgqueue_runs_total == 0"
LATENESS_AT_ZERO = "bgqueue_dispatch_lateness_seconds_count == 0"
BUDGETS = {"TEST_PROCESSING_BUDGET": "2", "TEST_EXPIRATION_WARNING": "0.4"}

Series = list[dict[str, Any]]  # a vector as Prometheus's HTTP API returns it


@pytest.fixture(autouse=True)
def _kill_processes_at_teardown(cluster: Cluster) -> Iterator[None]:
    """SIGKILL the test's bgqueue processes when it is done: this test is not about
    shutdown."""
    yield
    cluster.kill_all()


class Prometheus:
    """Debian's `prometheus` on a free loopback port, scraping static targets, with its
    storage and log in the test's directory."""

    def __init__(self, tmp_path: Path, jobs: dict[str, list[int]]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail(
                "prometheus is not on PATH: `make test` installs Debian's "
                "(apt-get install prometheus)",
                pytrace=False,
            )
        self.port = free_port()
        # YAML is a superset of JSON: no YAML writer needed.
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_INTERVAL}s",
                "scrape_timeout": f"{SCRAPE_INTERVAL}s",
            },
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in ports]}],
                }
                for job, ports in jobs.items()
            ],
        }
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(json.dumps(config))
        self.log_path = tmp_path / "prometheus.log"
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _get(self, path: str, params: dict[str, str]) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                answer = json.load(reply)
        except urllib.error.HTTPError as exc:  # a bad query: Prometheus says why in JSON
            raise AssertionError(f"{path} {params}: {exc.read().decode()}") from None
        assert answer["status"] == "success", answer
        return answer["data"]

    def ready(self) -> bool:
        assert self.popen.poll() is None, f"prometheus exited:\n{self.log()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                return True
        except OSError:
            return False

    def query(self, expr: str) -> Series:
        """An instant query at now, as a Grafana panel's last point."""
        data = self._get("/api/v1/query", {"query": expr})
        assert data["resultType"] == "vector", data
        result: Series = data["result"]
        return result

    def label_values(self, metric: str, label: str) -> list[str]:
        """Grafana's `label_values(metric, label)`: the label API, matched to the metric."""
        values: list[str] = self._get(f"/api/v1/label/{label}/values", {"match[]": metric})
        return values

    def stop(self) -> None:
        """SIGTERM (Prometheus flushes its head block and exits), then SIGKILL if it hangs."""
        if self.popen.poll() is None:
            self.popen.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[dict[str, list[int]]], Prometheus]]:
    """Start a Prometheus scraping `{job: [port, ...]}` on loopback; stopped at the end."""
    started: list[Prometheus] = []

    def start(jobs: dict[str, list[int]]) -> Prometheus:
        server = Prometheus(tmp_path, jobs)
        started.append(server)
        wait_for(server.ready, 30, "prometheus to be ready")
        return server

    yield start
    for server in started:
        server.stop()


# --- the dashboard -----------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def targets(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title and refId, expr) of every query of every panel."""
    return [
        (f"{panel['title']} [{target['refId']}]", target["expr"])
        for panel in board["panels"]
        for target in panel["targets"]
    ]


def multi_value(values: list[str]) -> str:
    """A multi-value variable with every value selected, as Grafana's Prometheus data
    source interpolates it: each value regex-escaped (the backslash itself escaped for the
    PromQL string), joined in a group."""
    escaped = [
        re.sub(r"([$^*{}\[\]'+?.()|])", r"\\\\\1", v.replace("\\", "\\" * 4)) for v in values
    ]
    return "(" + "|".join(escaped) + ")"


def interpolate(expr: str, variables: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"unknown variable ${name} in {expr}"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def shows_data(series: Series) -> str | None:
    """Why a panel's result shows nothing useful, or None if it shows data: at least one
    series, no NaN (0/0 or a quantile of no observations), something above zero, and
    every value of SHOWN that the query splits by above zero."""
    if not series:
        return "no series"
    values = [float(s["value"][1]) for s in series]
    if any(math.isnan(v) for v in values):
        return "NaN"
    if not any(v > 0 for v in values):
        return "all zero"
    for label, wanted in SHOWN.items():
        if any(label in s["metric"] for s in series):
            positive = {s["metric"][label] for s in series if float(s["value"][1]) > 0}
            if not wanted <= positive:
                return f"no {label} {sorted(wanted - positive)}"
    return None


def scraped_at_zero(server: Prometheus, apps: list[str]) -> bool:
    """Whether beat's and the workers' runs and beat's lateness of every app are stored at
    zero (before anything has run)."""
    runs = {(s["metric"]["job"], s["metric"]["app"]) for s in server.query(RUNS_AT_ZERO)}
    lateness = {s["metric"]["app"] for s in server.query(LATENESS_AT_ZERO)}
    expected = {(job, app) for job in ("beat", "worker") for app in apps}
    return runs == expected and lateness == set(apps)


# --- the test ------------------------------------------------------------------------------


def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    cluster: Cluster,
    sample_app: bg.BackgroundApp,
    redis_url: str,
    redis_client: redis.Redis,
    prometheus: Callable[[dict[str, list[int]]], Prometheus],
) -> None:
    """A beat and two workers (one per app, so the `app` variable has two values), scraped
    every second. The sample app's worker runs one request to each outcome: completed
    successfully, completed unsuccessfully, failed (raised), expired past its 2 s budget
    after its expiration handler was called; the transient app's worker holds a run past
    its deadline with a suspend delay, which charges the scope's quota. One request waits
    for its earliest-begin date and one for a worker on external power that never comes.
    Then every query of the dashboard returns data for them."""
    transient = transient_app.app
    transient._client = None  # a previous test's connection; the server was emptied since
    transient._announced = False
    transient.use_broker(redis_url)
    ports = {name: free_port() for name in ("beat", "w1", "w2")}
    server = prometheus({"beat": [ports["beat"]], "worker": [ports["w1"], ports["w2"]]})
    cluster.start(["beat", "--metrics-port", str(ports["beat"])], "beat")
    # Started together, then waited for: each worker's start-up takes seconds.
    workers = {
        ("w1", APP_ID): cluster.worker(
            "w1",
            ["external_power=false"],
            env={**BUDGETS, "BGQUEUE_METRICS_PORT": str(ports["w1"])},
            wait=False,
        ),
        ("w2", transient_app.APP_ID): cluster.worker(
            "w2",
            env={"BGQUEUE_METRICS_PORT": str(ports["w2"])},
            wait=False,
            app="tests.apps.transient_app:app",
            app_id=transient_app.APP_ID,
        ),
    }
    wait_for(
        lambda: all(
            cluster.worker_alive(*key) or not proc.alive() for key, proc in workers.items()
        ),
        30,
        "both workers",
    )
    for proc in workers.values():
        assert proc.alive(), proc.log()

    # The variable's query, as Grafana runs it, lists both apps once beat has seen them;
    # every target is up by then, so what follows is scraped from its start.
    variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "app")
    match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
    assert match, variable["definition"]
    apps = sorted([APP_ID, transient_app.APP_ID])
    wait_for(
        lambda: sorted(server.label_values(*match.groups())) == apps,
        20,
        f"{variable['definition']} to list {apps}",
    )
    wait_for(lambda: len(server.query("up == 1")) == 3, 20, "beat and both workers up")
    # rate() counts only growth between two samples, so the dashboard sees a first run or
    # claim only if its series was scraped at zero before: runs (workers, and beat's lost
    # runs) and lateness of both apps are.
    wait_for(lambda: scraped_at_zero(server, apps), 20, "counters scraped at zero")

    later = datetime.now(UTC) + timedelta(hours=1)
    sample_app.scheduler.submit_many(
        [
            bg.ProcessingTaskRequest(P + "a", payload={"complete": True}),
            bg.ProcessingTaskRequest(P + "b", payload={"complete": False}),
            bg.ProcessingTaskRequest(P + "c", payload={"raise": "boom"}),
            bg.ProcessingTaskRequest(P + "slow", payload={"sleep": 30, "expiration": "record"}),
            bg.ProcessingTaskRequest(P + "process", requires_external_power=True),
            bg.AppRefreshTaskRequest(P + "refresh", earliest_begin_date=later),
        ]
    )
    # Held 0.5 s past its 2 s budget by a suspend delay: that half second is charged.
    steps = [{"do": "request", "as": "d"}, {"do": "until", "t": 2.5}, {"do": "complete"}]
    transient.scheduler.submit(
        bg.ProcessingTaskRequest(f"{transient_app.APP_ID}.a", payload={"steps": steps})
    )
    ended = {"a": "completed", "b": "completed", "c": "failed", "slow": "expired"}
    wait_for(
        lambda: (
            {r.identifier.removeprefix(P): r.state for r in sample_app.scheduler.history()} == ended
        ),
        20,
        f"runs to end {ended}",
    )
    wait_for(
        lambda: redis_client.zcard(transient.keys.transient_ledger("default")),
        20,
        "the suspend delay to be charged",
    )

    # Every query as Grafana sends it with every app selected, polled until it shows
    # data (the last scrape may not have the last run yet).
    variables = {**GRAFANA_VARIABLES, "app": multi_value(apps)}
    queries = [(title, interpolate(expr, variables)) for title, expr in targets(dashboard())]
    assert queries
    results: dict[str, Series] = {}

    def all_show_data() -> bool:
        results.update((title, server.query(expr)) for title, expr in queries)
        return all(shows_data(series) is None for series in results.values())

    try:
        wait_for(all_show_data, 20, "every dashboard query to show data")
    except AssertionError as exc:
        report = "\n".join(
            f"{title}: {shows_data(results[title]) or 'ok'}: {expr}\n    {results[title]}"
            for title, expr in queries
            if title in results
        )
        raise AssertionError(f"{exc}; the last answers:\n{report}") from None
    # Both workers are counted, once each, however many apps are selected: every worker
    # reports one value of each condition it has (network and external_power always).
    live = results["Live workers [A]"]
    assert [float(s["value"][1]) for s in live] == [2], live
    by_condition: dict[str, float] = {}
    for s in results["Live workers by condition [A]"]:
        condition = s["metric"]["condition"]
        by_condition[condition] = by_condition.get(condition, 0) + float(s["value"][1])
    assert by_condition["network"] == by_condition["external_power"] == 2, by_condition
    print("\nWhat Prometheus answered each dashboard query (series; the first one):")
    for title, series in results.items():
        first = series[0]
        labels = {k: v for k, v in first["metric"].items() if k not in ("instance", "job")}
        print(f"  {title}: {len(series)}; {labels} = {first['value'][1]}")
