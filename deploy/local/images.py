"""``make images``: every image docker-compose.yml runs, built on this machine with no image registry.

- ``agent-monitor-local/debian:bookworm``: a minimal bookworm from debootstrap (Debian's mirror),
  imported once with ``docker import`` and kept by tag; its rootfs tarball is cached outside the
  repository (``~/.cache/agent-monitor/images/``) so a wiped daemon re-imports without debootstrap.
- ``agent-monitor-local/python:3.11-bookworm``: Debian's Python 3.11 as a stand-in for the official
  python image (deploy/local/python/Dockerfile).
- ``agent-monitor-local/kafka:<version>``: Java 17 from Debian and the Kafka jars monitor/broker.py
  fetches, with the apache/kafka image's environment interface (deploy/local/kafka/).
- ``agent-monitor-local/prometheus:bookworm``: Debian's prometheus package (deploy/local/prometheus/).
- ``agent-monitor:<version>``: the worker, deploy/Dockerfile built on the local Python image, from the
  repository as it is now (BuildKit's cache rebuilds what changed).

Grafana is not built: no reachable registry ships it (see deploy/README.md).

Usage: ``python -m deploy.local.images [--list]`` from the repository root (a Docker daemon must
answer; ``make images`` starts one if needed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

from monitor.broker import KAFKA_VERSION, LOG4J_VERSION, MAVEN_POM, SLF4J_VERSION, BrokerError, cache_dir, fetch_jars

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VERSION: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

BASE_IMAGE = "agent-monitor-local/debian:bookworm"
PYTHON_IMAGE = "agent-monitor-local/python:3.11-bookworm"
KAFKA_IMAGE = f"agent-monitor-local/kafka:{KAFKA_VERSION}"
PROMETHEUS_IMAGE = "agent-monitor-local/prometheus:bookworm"
WORKER_IMAGE = f"agent-monitor:{VERSION}"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("AGENT_MONITOR_DEBIAN_MIRROR", "http://deb.debian.org/debian")
LABEL = "org.agent-monitor.local-image"  # every image `make images` builds carries it


class ImageError(RuntimeError):
    """An image could not be built; the message says which and why."""


def images_cache() -> Path:
    return cache_dir() / "images"


def _run(cmd: Sequence[str], env: dict[str, str] | None = None, quiet: bool = False,
         input: bytes | None = None) -> subprocess.CompletedProcess:
    print("+ " + " ".join(cmd), flush=True)
    proc = subprocess.run(list(cmd), env=env, input=input,
                          stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None)
    if proc.returncode != 0:
        tail = proc.stdout.decode(errors="replace")[-4000:] if quiet and proc.stdout else ""
        raise ImageError(f"{cmd[0]} exited with {proc.returncode}: {' '.join(cmd)}\n{tail}")
    return proc


def docker_cli() -> list[str]:
    """The docker client to build with, with BuildKit (deploy/Dockerfile.dockerignore is BuildKit's).

    ``$AGENT_MONITOR_DOCKER`` if set; else ``docker`` when it has buildx; else Debian's docker.io
    client (/usr/bin/docker, 20.10), whose BuildKit is built in. A newer client without buildx
    refuses DOCKER_BUILDKIT=1 and its legacy builder ignores per-Dockerfile ignore files.
    """
    if os.environ.get("AGENT_MONITOR_DOCKER"):
        return [os.environ["AGENT_MONITOR_DOCKER"]]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "buildx", "version"], capture_output=True).returncode == 0:
        return [docker]
    if Path("/usr/bin/docker").exists():
        return ["/usr/bin/docker"]
    raise ImageError("no docker client with BuildKit: install Debian's docker.io (apt-get install -y docker.io) "
                     "or the buildx plugin")


def _build_cmd(docker: list[str]) -> list[str]:
    if subprocess.run([*docker, "buildx", "version"], capture_output=True).returncode == 0:
        return [*docker, "buildx", "build", "--load"]
    return [*docker, "build"]


def _build_env() -> dict[str, str]:
    return dict(os.environ, DOCKER_BUILDKIT="1", BUILDKIT_PROGRESS="plain")


def image_exists(docker: list[str], tag: str) -> bool:
    return subprocess.run([*docker, "image", "inspect", tag], capture_output=True).returncode == 0


# -- the Debian base ---------------------------------------------------------------------------------

def base_rootfs_tarball() -> Path:
    """A bookworm minbase rootfs as a tarball in the cache (debootstrap runs once)."""
    tarball = images_cache() / f"debian-{DEBIAN_SUITE}-minbase.tar"
    if tarball.exists():
        return tarball
    if shutil.which("debootstrap") is None:
        raise ImageError("debootstrap is not installed: apt-get install -y debootstrap (make images does)")
    if os.geteuid() != 0:
        raise ImageError("debootstrap needs root to build the base rootfs")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="agent-monitor-rootfs-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", "--include=ca-certificates", DEBIAN_SUITE, str(root),
              DEBIAN_MIRROR], quiet=True)
        security = DEBIAN_MIRROR.rstrip("/") + "-security"
        (root / "etc/apt/sources.list").write_text(
            f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n"
            f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main\n"
            f"deb {security} {DEBIAN_SUITE}-security main\n")
        # as Debian's official images: packages never start services inside a build
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        (root / "etc/apt/apt.conf.d/90agent-monitor").write_text(
            'APT::Install-Recommends "false";\nAcquire::Languages "none";\n')
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (root / junk).glob("*"):
                if f.is_file():
                    f.unlink()
        partial = tarball.with_suffix(".partial")
        _run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."])
        partial.rename(tarball)
    return tarball


def build_base(docker: list[str]) -> None:
    if image_exists(docker, BASE_IMAGE):
        print(f"{BASE_IMAGE}: present (cached by tag)")
        return
    tarball = base_rootfs_tarball()
    _run([*docker, "import",
          "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
          "--change", "ENV LANG=C.UTF-8",
          "--change", f"LABEL {LABEL}=base",
          "--change", 'CMD ["bash"]',
          str(tarball), BASE_IMAGE])


# -- images from a Dockerfile ------------------------------------------------------------------------

def _build(docker: list[str], tag: str, context: Path, dockerfile: Path | None = None,
           args: dict[str, str] | None = None) -> None:
    cmd = [*_build_cmd(docker), "-t", tag, "--label", f"{LABEL}={tag}"]
    if dockerfile:
        cmd += ["-f", str(dockerfile)]
    for k, v in (args or {}).items():
        cmd += ["--build-arg", f"{k}={v}"]
    _run([*cmd, str(context)], env=_build_env())


def build_python(docker: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="agent-monitor-python-ctx-", dir="/var/tmp") as tmp:
        ctx = Path(tmp)
        shutil.copy(HERE / "python" / "Dockerfile", ctx / "Dockerfile")
        (ctx / "extra-ca").mkdir()
        for crt in sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt")):
            shutil.copy(crt, ctx / "extra-ca" / crt.name)
        _build(docker, PYTHON_IMAGE, ctx, args={"BASE_IMAGE": BASE_IMAGE})


def kafka_image_jars(version: str = KAFKA_VERSION) -> Path:
    """The broker launcher's jars plus kafka-tools (bin/kafka-topics.sh), resolved by Maven together
    so that every artifact has one version; cached next to the launcher's jars."""
    broker_libs = fetch_jars(version)
    libs = cache_dir() / f"kafka-{version}" / "image-libs"
    if (libs / ".complete").exists():
        return libs
    work = libs.parent / "image-pom"
    work.mkdir(parents=True, exist_ok=True)
    pom = MAVEN_POM.format(kafka=version, slf4j=SLF4J_VERSION, log4j=LOG4J_VERSION).replace(
        "</dependencies>",
        f"  <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId>"
        f"<version>{version}</version></dependency>\n  </dependencies>")
    (work / "pom.xml").write_text(pom)
    partial = libs.with_name("image-libs.partial")
    shutil.rmtree(partial, ignore_errors=True)
    _run(["mvn", "-B", "-q", "-f", str(work / "pom.xml"), "dependency:copy-dependencies",
          f"-DoutputDirectory={partial}", "-DincludeScope=runtime"], quiet=True)
    missing = {p.name for p in broker_libs.glob("*.jar")} - {p.name for p in partial.glob("*.jar")}
    if missing:
        raise ImageError(f"kafka-tools changed the versions of the launcher's jars: {sorted(missing)} missing")
    shutil.rmtree(libs, ignore_errors=True)
    partial.rename(libs)
    (libs / ".complete").write_text(version)
    return libs


def build_kafka(docker: list[str]) -> None:
    try:
        libs = kafka_image_jars()
    except BrokerError as exc:  # Maven missing or failing: reported like every other build failure
        raise ImageError(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="agent-monitor-kafka-ctx-", dir="/var/tmp") as tmp:
        ctx = Path(tmp) / "ctx"
        shutil.copytree(HERE / "kafka", ctx)
        (ctx / "libs").mkdir()
        for jar in sorted(libs.glob("*.jar")):
            # hard links where possible: the jars are 45 MB and the context is sent to the daemon anyway
            if _same_fs(jar, ctx):
                os.link(jar, ctx / "libs" / jar.name)
            else:
                shutil.copy(jar, ctx / "libs" / jar.name)
        _build(docker, KAFKA_IMAGE, ctx, args={"BASE_IMAGE": BASE_IMAGE})


def _same_fs(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


def build_prometheus(docker: list[str]) -> None:
    _build(docker, PROMETHEUS_IMAGE, HERE / "prometheus", args={"BASE_IMAGE": BASE_IMAGE})


def build_worker(docker: list[str]) -> None:
    _build(docker, WORKER_IMAGE, ROOT, dockerfile=ROOT / "deploy" / "Dockerfile",
           args={"PYTHON_IMAGE": PYTHON_IMAGE})


STEPS = [
    (BASE_IMAGE, build_base),
    (PYTHON_IMAGE, build_python),
    (KAFKA_IMAGE, build_kafka),
    (PROMETHEUS_IMAGE, build_prometheus),
    (WORKER_IMAGE, build_worker),
]


def build_all() -> dict[str, float]:
    """Build every image in order; returns seconds per image."""
    docker = docker_cli()
    if subprocess.run([*docker, "version"], capture_output=True).returncode != 0:
        raise ImageError("no Docker daemon answers: start dockerd (make images starts one when none runs)")
    took = {}
    for tag, step in STEPS:
        started = time.monotonic()
        print(f"== {tag}", flush=True)
        step(docker)
        took[tag] = time.monotonic() - started
    return took


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the images' tags and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(tag for tag, _ in STEPS))
        return 0
    started = time.monotonic()
    try:
        took = build_all()
    except ImageError as exc:
        print(f"make images: {exc}", file=sys.stderr)
        return 1
    docker = docker_cli()
    print("\nimage                                      seconds  size")
    for tag, secs in took.items():
        size = subprocess.run([*docker, "image", "inspect", "-f", "{{.Size}}", tag], capture_output=True,
                              text=True).stdout.strip()
        print(f"{tag:<42} {secs:7.1f}  {int(size or 0) / 2**20:.0f} MiB")
    print(f"all images in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
