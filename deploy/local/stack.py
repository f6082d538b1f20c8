"""docker-compose.yml as ``make test-containers`` runs it, read from the compose file itself.

:func:`local_plan` reads ``docker-compose.yml`` and the local override (``compose.override.yml``,
the images ``make images`` builds), and turns every service into what to run: image, command,
environment, ports, volumes, secrets, healthcheck, replicas, hardening, start order. Nothing about
a service is written down twice: the container tests start exactly this plan, and
``tests/deploy/test_local_stack.py`` (no Docker needed) checks the plan against the compose file, so the
two cannot drift. A key of a service that this module does not know fails the plan: a new compose
setting needs a decision here (apply it, or say why not).

:class:`Stack` starts a plan with testcontainers (a network named after the run, named volumes,
secrets as read-only files in ``/run/secrets``) and stops it in reverse order, each service within
its ``stop_grace_period``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
OVERRIDE_FILE = HERE / "compose.override.yml"
RUN_LABEL = "org.agent-monitor.test-run"

# every key a service may have, and what the container tests do with it
APPLIED = frozenset({
    "image", "command", "environment", "ports", "volumes", "secrets", "hostname", "healthcheck",
    "depends_on", "deploy", "security_opt", "cap_drop", "stop_grace_period",
})
NOT_APPLIED = {
    "build": "the images come from `make images`; the override gives the worker's build its local base",
    "restart": "a test must see a container that fails, not its restart",
    "profiles": "a service in a profile (the override puts grafana in one) is not run",
}
_DEPLOY_KEYS = frozenset({"replicas"})
_VAR = re.compile(r"\$(?:\$|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


class PlanError(ValueError):
    """The compose file holds something the container tests cannot run as written."""


@dataclass(frozen=True)
class Port:
    host_ip: str
    host_port: int
    container_port: int
    protocol: str = "tcp"


@dataclass(frozen=True)
class Mount:
    """A bind mount (``source`` an absolute path), a named volume, or a secret file."""

    kind: str  # "bind" | "volume" | "secret"
    source: str
    target: str
    read_only: bool


@dataclass
class ServicePlan:
    name: str
    image: str  # what runs: the local image
    compose_image: str  # what docker-compose.yml names
    command: list[str] | None
    environment: dict[str, str]
    ports: list[Port]
    mounts: list[Mount]
    hostname: str | None
    healthcheck: dict[str, Any] | None  # Docker API form (durations in ns)
    depends_on: dict[str, str]  # service -> condition
    replicas: int
    security_opt: list[str]
    cap_drop: list[str]
    stop_grace_period: float  # seconds

    def container_names(self, project: str) -> list[str]:
        return [f"{project}-{self.name}-{i}" for i in range(1, self.replicas + 1)]


@dataclass
class StackPlan:
    services: dict[str, ServicePlan]  # in start order
    not_run: dict[str, str]  # service -> why
    volumes: list[str]  # named volumes of the services run
    secrets: dict[str, str]  # secret -> its content


# -- reading the compose file --------------------------------------------------------------------------

def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def merge(base: Any, override: Any, where: str = "") -> Any:
    """Compose's merge for what an override file may hold here: mappings merge key by key, scalars
    replace, a list is taken where the base has none. A list over a base's list is refused:
    compose merges those per key (ports, volumes, ...), which this module does not reproduce."""
    if isinstance(override, list) and base is not None:
        raise PlanError(f"the override sets a list over the base's at {where}: not merged here")
    if isinstance(override, dict):
        out = dict(base) if isinstance(base, dict) else {}
        for key, value in override.items():
            out[key] = merge(out.get(key), value, f"{where}/{key}")
        return out
    return override


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?error}``,
    ``${VAR?error}``, ``$VAR`` and ``$$``."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        present = name in env
        val = env.get(name, "")
        if op in (":-", ":?") and not val or op in ("-", "?") and not present:
            if op.endswith("-"):
                return arg
            raise PlanError(f"{name} is required: {arg}")
        return val

    return _VAR.sub(sub, value)


def _interpolate_all(obj: Any, env: Mapping[str, str]) -> Any:
    if isinstance(obj, str):
        return interpolate(obj, env)
    if isinstance(obj, list):
        return [_interpolate_all(v, env) for v in obj]
    if isinstance(obj, dict):
        return {k: _interpolate_all(v, env) for k, v in obj.items()}
    return obj


def duration_seconds(value: str | int | float) -> float:
    """Compose durations: ``30s``, ``1m30s``, ``500ms``, ``1h``."""
    if isinstance(value, (int, float)):
        return float(value)
    total, rest = 0.0, value.strip()
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", rest):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    if not re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ms|us|h|m|s))+", rest):
        raise PlanError(f"not a compose duration: {value!r}")
    return total


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str] | None:
    cmd = service.get("command")
    if cmd is None:
        return None
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def parse_port(spec: str | int) -> Port:
    """``[HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTO]``; the container tests publish only what
    names its host port (a port range or a random host port has no fixed address to test)."""
    text, _, proto = str(spec).partition("/")
    parts = text.rsplit(":", 2)
    if len(parts) == 3:
        ip, host, container = parts
    elif len(parts) == 2:
        ip, (host, container) = "0.0.0.0", parts  # noqa: S104 - compose's default for a published port
    else:
        raise PlanError(f"port {spec!r} names no host port")
    return Port(ip, int(host), int(container), proto or "tcp")


def _mounts(name: str, service: dict[str, Any], declared: set[str]) -> list[Mount]:
    mounts = []
    for spec in service.get("volumes") or []:
        if not isinstance(spec, str):
            raise PlanError(f"{name}: only the short volume syntax is read here: {spec!r}")
        source, target, *mode = spec.split(":")
        read_only = bool(mode) and "ro" in mode[0].split(",")
        if source.startswith((".", "/")):
            mounts.append(Mount("bind", str((ROOT / source).resolve()), target, read_only))
        elif source in declared:
            mounts.append(Mount("volume", source, target, read_only))
        else:
            raise PlanError(f"{name}: volume {source!r} is not declared under the top-level volumes")
    return mounts


def _healthcheck(service: dict[str, Any]) -> dict[str, Any] | None:
    hc = service.get("healthcheck")
    if not hc:
        return None
    ns = 1_000_000_000
    test = hc["test"]
    return {
        "test": ["CMD-SHELL", test] if isinstance(test, str) else list(test),
        "interval": int(duration_seconds(hc.get("interval", "30s")) * ns),
        "timeout": int(duration_seconds(hc.get("timeout", "30s")) * ns),
        "retries": int(hc.get("retries", 3)),
        "start_period": int(duration_seconds(hc.get("start_period", "0s")) * ns),
    }


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: (spec or {}).get("condition", "service_started") for d, spec in deps.items()}


def _start_order(services: dict[str, dict[str, Any]]) -> list[str]:
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise PlanError(f"depends_on has a cycle through {name}")
        visiting.add(name)
        for dep in _depends_on(services[name]):
            if dep not in services:
                raise PlanError(f"{name} depends on {dep}, which is not run")
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in services:
        visit(name)
    return order


def plan_stack(compose: dict[str, Any], override: dict[str, Any], env: Mapping[str, str]) -> StackPlan:
    """What the container tests run for ``compose`` merged with ``override``, interpolated with
    ``env`` (as compose would with that environment)."""
    merged = merge(compose, override)
    services_all: dict[str, dict[str, Any]] = merged["services"]
    not_run = {name: f"in profile(s) {', '.join(s['profiles'])} of the local override (see deploy/README.md)"
               for name, s in services_all.items() if s.get("profiles")}
    run = {n: _interpolate_all(s, env) for n, s in services_all.items() if n not in not_run}
    declared = set((merged.get("volumes") or {}).keys())
    secrets_spec = merged.get("secrets") or {}
    plans: dict[str, ServicePlan] = {}
    used_volumes: list[str] = []
    used_secrets: dict[str, str] = {}
    for name in _start_order(run):
        svc = run[name]
        unknown = set(svc) - APPLIED - set(NOT_APPLIED)
        if unknown:
            raise PlanError(f"{name}: compose keys {sorted(unknown)} are neither applied by the container "
                            "tests nor listed as left out (deploy/local/stack.py)")
        deploy = svc.get("deploy") or {}
        if set(deploy) - _DEPLOY_KEYS:
            raise PlanError(f"{name}: deploy keys {sorted(set(deploy) - _DEPLOY_KEYS)} are not applied")
        mounts = _mounts(name, svc, declared)
        for secret in svc.get("secrets") or []:
            if not isinstance(secret, str):
                raise PlanError(f"{name}: only the short secrets syntax is read here: {secret!r}")
            spec = secrets_spec.get(secret)
            if spec is None:
                raise PlanError(f"{name}: secret {secret!r} is not declared under the top-level secrets")
            if "environment" in spec:
                value = env.get(spec["environment"])
                if not value:
                    raise PlanError(f"secret {secret!r} comes from ${spec['environment']}, which is not set")
            elif "file" in spec:
                value = (ROOT / spec["file"]).read_text()
            else:
                raise PlanError(f"secret {secret!r}: neither environment nor file")
            used_secrets[secret] = value
            mounts.append(Mount("secret", secret, f"/run/secrets/{secret}", True))
        used_volumes += [m.source for m in mounts if m.kind == "volume" and m.source not in used_volumes]
        compose_image = compose["services"][name]["image"]
        plans[name] = ServicePlan(
            name=name,
            image=svc["image"],
            compose_image=compose_image,
            command=_command(svc),
            environment=_environment(svc),
            ports=[parse_port(p) for p in svc.get("ports") or []],
            mounts=mounts,
            hostname=svc.get("hostname"),
            healthcheck=_healthcheck(svc),
            depends_on=_depends_on(svc),
            replicas=int(deploy.get("replicas", 1)),
            security_opt=list(svc.get("security_opt") or []),
            cap_drop=list(svc.get("cap_drop") or []),
            stop_grace_period=duration_seconds(svc.get("stop_grace_period", "10s")),
        )
    for name, plan in plans.items():
        for dep, condition in plan.depends_on.items():
            if condition == "service_healthy" and plans[dep].healthcheck is None:
                raise PlanError(f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck")
            if condition not in ("service_started", "service_healthy", "service_completed_successfully"):
                raise PlanError(f"{name}: depends_on condition {condition!r} is not known")
    return StackPlan(services=plans, not_run=not_run, volumes=used_volumes, secrets=used_secrets)


def local_plan(env: Mapping[str, str]) -> StackPlan:
    """The plan of docker-compose.yml with the local override: what ``make test-containers`` runs."""
    return plan_stack(load_yaml(COMPOSE_FILE), load_yaml(OVERRIDE_FILE), env)


# -- running a plan -------------------------------------------------------------------------------------

class StackError(RuntimeError):
    """A service did not come up as its plan says; the message holds its logs' tail."""


def _port_free(port: Port) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((port.host_ip, port.host_port))
            return True
        except OSError:
            return False


@dataclass
class Stack:
    """A plan's containers, started in order with testcontainers, stopped in reverse order."""

    plan: StackPlan
    project: str = field(default_factory=lambda: f"agent-monitor-test-{uuid.uuid4().hex[:8]}")
    log: Callable[[str], None] = print
    containers: dict[str, list[Any]] = field(default_factory=dict)  # service -> DockerContainer
    exit_codes: dict[str, int] = field(default_factory=dict)  # container name -> code, once stopped
    _network: Any = None
    _secrets_dir: tempfile.TemporaryDirectory | None = None
    _order: list[str] = field(default_factory=list)

    @property
    def network_name(self) -> str:
        return f"{self.project}_default"

    def _docker(self) -> Any:
        import docker

        return docker.from_env()

    def up(self) -> None:
        from testcontainers.core.config import testcontainers_config
        from testcontainers.core.network import Network

        # Ryuk (the reaper) is an image from Docker Hub, which no registry here serves: down() removes
        # everything this stack made, and every object carries RUN_LABEL for a manual clean-up
        testcontainers_config.ryuk_disabled = True
        busy = [p for s in self.plan.services.values() for p in s.ports if not _port_free(p)]
        if busy:
            raise StackError("host ports taken (the stack publishes the ports docker-compose.yml publishes): "
                             + ", ".join(f"{p.host_ip}:{p.host_port}" for p in busy))
        client = self._docker()
        labels = {RUN_LABEL: self.project}
        for volume in self.plan.volumes:
            client.volumes.create(f"{self.project}_{volume}", labels=labels)
        self._secrets_dir = tempfile.TemporaryDirectory(prefix=f"{self.project}-secrets-")
        for secret, value in self.plan.secrets.items():
            path = Path(self._secrets_dir.name) / secret
            path.write_text(value)
            path.chmod(0o444)  # compose's secret files are world-readable; the services run as non-root
        self._network = Network(docker_network_kw={"labels": labels})
        self._network.name = self.network_name
        self._network.create()
        for name, service in self.plan.services.items():
            for dep, condition in service.depends_on.items():
                self.wait_for(dep, condition)
            self.log(f"starting {name} ({service.image}, {service.replicas} replica(s))")
            # registered before it starts: down() must find a container whose start failed half-way
            self.containers[name] = []
            self._order.append(name)
            for cname in service.container_names(self.project):
                container = self._container(service, cname)
                self.containers[name].append(container)
                container.start()

    def _container(self, service: ServicePlan, container_name: str) -> Any:
        from docker.types import Mount as DockerMount
        from testcontainers.core.container import DockerContainer

        assert self._secrets_dir is not None  # noqa: S101 - the stack was entered (its secrets written)
        mounts = []
        for m in service.mounts:
            if m.kind == "bind":
                mounts.append(DockerMount(m.target, m.source, type="bind", read_only=m.read_only))
            elif m.kind == "volume":
                mounts.append(DockerMount(m.target, f"{self.project}_{m.source}", type="volume",
                                          read_only=m.read_only))
            else:
                mounts.append(DockerMount(m.target, str(Path(self._secrets_dir.name) / m.source), type="bind",
                                          read_only=True))
        kwargs: dict[str, Any] = {"mounts": mounts, "labels": {RUN_LABEL: self.project}}
        if service.hostname:
            kwargs["hostname"] = service.hostname
        if service.healthcheck:
            kwargs["healthcheck"] = service.healthcheck
        if service.security_opt:
            kwargs["security_opt"] = service.security_opt
        if service.cap_drop:
            kwargs["cap_drop"] = service.cap_drop
        container = DockerContainer(service.image, command=service.command, env=dict(service.environment),
                                    name=container_name, network=self._network,
                                    network_aliases=[service.name], **kwargs)
        for p in service.ports:
            # bound to the compose file's address (with_bind_ports takes no address)
            container.ports[f"{p.container_port}/{p.protocol}"] = (p.host_ip, p.host_port)
        return container

    def wrapped(self, service: str) -> list[Any]:
        """The docker SDK's containers of a service, freshly inspected."""
        from testcontainers.core.exceptions import ContainerStartException

        out = []
        for c in self.containers[service]:
            try:
                w = c.get_wrapped_container()
            except ContainerStartException:  # its creation failed: nothing to inspect
                continue
            w.reload()
            out.append(w)
        return out

    def logs(self, service: str, tail: int = 4000) -> str:
        parts = []
        for w in self.wrapped(service):
            parts.append(f"--- {w.name} ({w.status})\n" + w.logs().decode(errors="replace")[-tail:])
        return "\n".join(parts)

    def wait_for(self, service: str, condition: str, timeout: float | None = None) -> None:
        """Block until every replica of ``service`` meets a depends_on condition."""
        plan = self.plan.services[service]
        if condition == "service_started":
            return
        if timeout is None:
            hc = plan.healthcheck or {}
            ns = 1e9
            timeout = 60 + (hc.get("start_period", 0) + hc.get("interval", 0) * hc.get("retries", 0)) / ns
        self.log(f"waiting for {service}: {condition}")
        deadline = time.monotonic() + timeout
        while True:
            states = self.wrapped(service)
            if condition == "service_healthy":
                health = [(w.attrs["State"].get("Health") or {}).get("Status") for w in states]
                if all(h == "healthy" for h in health):
                    return
                if any(w.status == "exited" for w in states) or "unhealthy" in health:
                    raise StackError(f"{service} did not become healthy ({health}):\n{self.logs(service)}")
            elif condition == "service_completed_successfully":
                if all(w.status == "exited" for w in states):
                    codes = [w.attrs["State"]["ExitCode"] for w in states]
                    if any(codes):
                        raise StackError(f"{service} exited with {codes}:\n{self.logs(service)}")
                    return
            if time.monotonic() > deadline:
                raise StackError(f"{service}: {condition} not met within {timeout:.0f}s:\n{self.logs(service)}")
            time.sleep(1)

    def stop_service(self, service: str) -> dict[str, int]:
        """Stop a service's replicas as ``docker compose stop`` does (SIGTERM, then SIGKILL after its
        stop_grace_period); returns each container's exit code."""
        grace = self.plan.services[service].stop_grace_period
        codes = {}
        for w in self.wrapped(service):
            if w.status == "running":
                w.stop(timeout=int(grace))
            w.reload()
            codes[w.name] = w.attrs["State"]["ExitCode"]
        self.exit_codes.update(codes)
        return codes

    def down(self) -> None:
        """Stop every service in reverse start order, then remove containers, network, volumes."""
        errors = []
        for service in reversed(self._order):
            with contextlib.suppress(Exception):
                self.stop_service(service)
            for c in self.containers.get(service, []):
                try:
                    c.stop()  # removes the container and its anonymous volumes
                except Exception as exc:  # noqa: BLE001 - go on removing the rest
                    errors.append(f"{service}: {exc}")
        if self._network is not None:
            try:
                self._network.remove()
            except Exception as exc:  # noqa: BLE001
                errors.append(f"network: {exc}")
        client = self._docker()
        for volume in self.plan.volumes:
            try:
                client.volumes.get(f"{self.project}_{volume}").remove(force=True)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"volume {volume}: {exc}")
        if self._secrets_dir is not None:
            self._secrets_dir.cleanup()
        if errors:
            raise StackError("stopping the stack left things behind: " + "; ".join(errors))


def environment_for_tests(token: str) -> dict[str, str]:
    """The environment compose would see for the container tests: the metrics token, and the API
    service's key entry whose key is that same token (NAME:SHA256), and nothing else (the host's
    own AGENT_MONITOR_* must not change what runs)."""
    api_key = "tests:" + hashlib.sha256(token.encode()).hexdigest()
    return {"AGENT_MONITOR_METRICS_TOKEN": token, "AGENT_MONITOR_API_KEYS": api_key}


def leftovers() -> list[str]:
    """Containers of earlier runs that were not removed (a killed test run): their names."""
    import docker

    client = docker.from_env()
    return [c.name for c in client.containers.list(all=True, filters={"label": RUN_LABEL})]


if __name__ == "__main__":  # pragma: no cover - print the plan
    import json
    from dataclasses import asdict

    print(json.dumps(asdict(local_plan(environment_for_tests(os.environ.get("AGENT_MONITOR_METRICS_TOKEN",
                                                                                 "t")))), indent=2))
