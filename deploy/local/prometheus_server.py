"""Prometheus and promtool from Debian's ``prometheus`` package (``make prometheus``), run on this
machine against ``deploy/prometheus.yml`` and ``deploy/alert-rules.yml``: what the tests and
``docs/pictures.py`` use to prove the rules, the scrape config and the dashboard's queries.

:func:`local_config` is the shipped ``prometheus.yml`` with only what cannot hold outside compose
replaced: the workers' DNS discovery by static targets, the secret's path by a token file here, the
rules' path by the repository's file, and (for a short test) the intervals. The bearer-token scrape,
the job names and everything else are the shipped ones.

Example (a worker serving /metrics on 127.0.0.1:9464 with the token in ``token.txt``)::

    from pathlib import Path
    from deploy.local.prometheus_server import PrometheusServer, local_config

    config = local_config(["127.0.0.1:9464"], Path("token.txt"))
    with PrometheusServer(config, Path("/tmp/prom")) as prom:
        print(prom.query("sum(agent_monitor_verdicts_total)"))
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_YML = ROOT / "deploy" / "prometheus.yml"
ALERT_RULES = ROOT / "deploy" / "alert-rules.yml"
ALERT_RULES_TESTS = ROOT / "deploy" / "alert-rules.test.yml"
WORKER_JOB = "agent-monitor"

T = TypeVar("T")


class PrometheusMissing(RuntimeError):
    """Debian's prometheus package is not installed."""


class PrometheusError(RuntimeError):
    """The server did not start, or an API call failed; the message ends with its log."""


def binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; raises :class:`PrometheusMissing` with the fix.

    >>> binary("promtool")  # doctest: +SKIP
    '/usr/bin/promtool'
    """
    found = shutil.which(name)
    if not found:
        raise PrometheusMissing(f"{name} not found: `make prometheus` installs Debian's prometheus package "
                                "(apt-get install prometheus), which provides prometheus and promtool")
    return found


def promtool(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run promtool; the caller checks ``returncode`` and reads ``stdout``/``stderr``."""
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def local_config(targets: list[str], token_file: Path, *, interval: str = "1s",
                 rules: Path = ALERT_RULES, self_target: str | None = None) -> dict[str, Any]:
    """``deploy/prometheus.yml`` for workers at ``targets`` (``host:port``) on this machine.

    >>> cfg = local_config(["127.0.0.1:9464"], Path("/t/token"))
    >>> job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "agent-monitor")
    >>> job["static_configs"], job["authorization"]
    ([{'targets': ['127.0.0.1:9464']}], {'type': 'Bearer', 'credentials_file': '/t/token'})
    """
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = interval
    config["global"]["evaluation_interval"] = interval
    config["rule_files"] = [str(rules)]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    worker = jobs[WORKER_JOB]
    if "dns_sd_configs" not in worker or "credentials_file" not in worker["authorization"]:
        raise ValueError(f"{PROMETHEUS_YML}: the {WORKER_JOB} job is no longer discovered by DNS with a token "
                         "file; update local_config to what it does now")
    del worker["dns_sd_configs"]
    worker["static_configs"] = [{"targets": list(targets)}]
    worker["authorization"]["credentials_file"] = str(token_file)
    if self_target:
        jobs["prometheus"]["static_configs"] = [{"targets": [self_target]}]
    return config


class PrometheusServer:
    """A Prometheus server on loopback with ``config``, its data and log under ``workdir``."""

    def __init__(self, config: dict[str, Any], workdir: Path, port: int | None = None) -> None:
        from monitor.broker import free_port

        self.workdir = workdir
        self.port = port or free_port()
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> Self:
        """Start it and wait until it is ready; raises :class:`PrometheusError` with its log."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        check = promtool("check", "config", str(config_path))
        if check.returncode != 0:
            raise PrometheusError(f"promtool check config {config_path} failed:\n{check.stdout}{check.stderr}")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [binary("prometheus"), f"--config.file={config_path}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1d", "--log.level=warn"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        try:
            self.wait_for(lambda: self._ready() or None, timeout, "Prometheus to be ready")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:  # noqa: S310 - our own http:// URL
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- the HTTP API ---------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``: its ``data``; raises :class:`PrometheusError` with Prometheus'
        error (a query that does not parse is ``bad_data``)."""
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - our own http:// URL
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now: the result vector (``[]`` when nothing matches)."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]

    def targets(self, job: str = WORKER_JOB) -> list[dict[str, Any]]:
        return [t for t in self.api("targets")["activeTargets"] if t["labels"]["job"] == job]

    def rules(self) -> dict[str, dict[str, Any]]:
        """Every loaded rule by name, with its ``health``, ``state`` and ``alerts``."""
        return {r["name"]: r for g in self.api("rules")["groups"] for r in g["rules"]}

    def wait_for(self, probe: Callable[[], T | None], timeout: float, what: str) -> T:
        """Call ``probe`` until it returns something other than None (or False)."""
        deadline = time.monotonic() + timeout
        while True:
            got = probe()
            if got:
                return got
            if time.monotonic() > deadline:
                raise PrometheusError(f"timed out after {timeout:g}s waiting for {what}:\n{self.log_tail()}")
            time.sleep(0.5)
