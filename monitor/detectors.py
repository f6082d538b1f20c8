"""Offline implementations of invariant-ai's ``semgrep`` and ``pii`` detectors.

Policies keep the names they use (``from invariant.detectors import semgrep, pii``); :func:`install`
registers these implementations behind them, so nothing a policy runs reaches the network:

- ``semgrep(code, lang="python"|"bash")`` scans with the rule files shipped in this package
  (``monitor/semgrep_rules/*.yml``) instead of invariant's registry packs (``r/python.lang.security``,
  ``r/bash``), which semgrep downloads at run time. Version check and metrics are off; the scan is
  bounded in time and in parallel scans, and results are cached by the code's sha256 (a stateless
  check re-reads the same past tool calls on every request).
- ``pii(text)`` runs presidio's pattern recognizers (e-mail, phone, credit card, IBAN, IP, URL, SSN,
  ...) on a blank spaCy English pipeline, or on an installed spaCy model when one is named by
  ``AGENT_MONITOR_PII_SPACY_MODEL`` (or is installed as ``en_core_web_lg``/``md``/``sm``), never one
  downloaded at run time; tldextract's public-suffix list comes from its bundled snapshot.

Example::

    >>> from monitor.detectors import install, rules_file
    >>> install()  # idempotent
    >>> rules_file("python").name, rules_file("bash").name
    ('python.yml', 'bash.yml')
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from monitor import sandbox
from monitor.errors import MonitorError

RULES_DIR = Path(__file__).parent / "semgrep_rules"
SUFFIXES = {"python": ".py", "bash": ".sh"}
SCAN_TIMEOUT_S = float(os.environ.get("AGENT_MONITOR_SEMGREP_TIMEOUT", "20"))
MAX_PARALLEL_SCANS = int(os.environ.get("AGENT_MONITOR_SEMGREP_PARALLEL", "2"))
MAX_CODE_BYTES = 256 * 1024  # larger code is scanned by its first 256 KiB only
# semgrep never phones home: no version check, no metrics, no registry
SEMGREP_ENV = {"SEMGREP_ENABLE_VERSION_CHECK": "0", "SEMGREP_SEND_METRICS": "off"}

_installed = False
_lock = threading.Lock()


class DetectorUnavailable(MonitorError, RuntimeError):
    """A detector's program or package is not installed; the check fails closed with this reason."""


def rules_file(lang: str) -> Path:
    """The shipped semgrep rule file for ``lang`` (``python`` or ``bash``).

    >>> rules_file("go")
    Traceback (most recent call last):
    ...
    ValueError: Unsupported language: go (the offline semgrep rules cover python, bash)
    """
    if lang not in SUFFIXES:
        raise ValueError(f"Unsupported language: {lang} (the offline semgrep rules cover "
                         f"{', '.join(SUFFIXES)})")
    return RULES_DIR / f"{lang}.yml"


def semgrep_binary() -> str:
    """The semgrep executable: ``AGENT_MONITOR_SEMGREP``, next to this Python, or on PATH."""
    named = os.environ.get("AGENT_MONITOR_SEMGREP")
    if named:
        return named
    beside = Path(sys.executable).parent / "semgrep"
    if beside.exists():
        return str(beside)
    found = shutil.which("semgrep")
    if not found:
        raise DetectorUnavailable("semgrep is not installed (pip install 'agent-monitor[detectors]')")
    return found


class _LRU:
    """A small thread-safe LRU (the reference engine evaluates on threads of its own)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)


class OfflineSemgrep:
    """Stands in for invariant's ``SemgrepDetector``: same ``adetect_all(code, lang)``, local rules.

    Issues are invariant's ``CodeIssue`` (``description``, ``severity``), the description worded as
    invariant words it: ``"<message> (source: <source>, lines: <the matched lines>)"``.
    """

    def __init__(self, cache_size: int = 4096) -> None:
        self.cache = _LRU(cache_size)
        self._semaphores: dict[int, asyncio.Semaphore] = {}
        self._experimental: bool | None = None  # osemgrep (fast start) works here

    def get_severity(self, severity: str) -> str:
        return {"ERROR": "error", "WARNING": "warning"}.get(severity, "info")

    def _semaphore(self) -> asyncio.Semaphore:
        # one per event loop: the reference engine runs policies on loops of its own threads
        loop = asyncio.get_running_loop()
        sem = self._semaphores.get(id(loop))
        if sem is None:
            sem = self._semaphores[id(loop)] = asyncio.Semaphore(MAX_PARALLEL_SCANS)
        return sem

    async def adetect_all(self, code: str, lang: str) -> list[Any]:
        from invariant.analyzer.runtime.utils.code import CodeIssue

        rules = rules_file(lang)
        if not isinstance(code, str):
            code = str(code)
        code = code.encode("utf-8", "replace")[:MAX_CODE_BYTES].decode("utf-8", "ignore")
        key = (lang, hashlib.sha256(code.encode()).hexdigest())
        found = self.cache.get(key)
        if found is None:
            async with self._semaphore():
                found = await self._scan(code, lang, rules)
            self.cache.put(key, found)
        return [CodeIssue(description=d, severity=s) for d, s in found]

    async def _scan(self, code: str, lang: str, rules: Path) -> list[tuple[str, str]]:
        binary = semgrep_binary()
        # the scan writes a temporary file and runs semgrep: the project's own code, which the
        # policy sandbox lets do that while a policy runs (a policy cannot reach sandbox.trusted)
        with sandbox.trusted(), tempfile.TemporaryDirectory(prefix="agent-monitor-semgrep-") as tmp:
            target = Path(tmp) / f"code{SUFFIXES[lang]}"
            target.write_text(code)
            report = None
            for experimental in ([True, False] if self._experimental is None
                                 else [self._experimental]):
                report = await self._run(binary, rules, target, experimental, tmp)
                if report is not None:
                    self._experimental = experimental
                    break
            if report is None:
                raise RuntimeError(f"semgrep gave no report for {lang} code (rules {rules})")
        lines = code.splitlines()
        out = []
        for res in report.get("results", []):
            extra = res.get("extra", {})
            start, end = res.get("start", {}).get("line", 1), res.get("end", {}).get("line", 1)
            # semgrep hides matched lines unless logged in ("requires login"): cut them ourselves
            text = "\n".join(lines[max(0, start - 1):end])
            source = (extra.get("metadata") or {}).get("source", "agent-monitor")
            description = f"{extra.get('message', res.get('check_id'))} (source: {source}, lines: {text})"
            out.append((description, self.get_severity(extra.get("severity", ""))))
        return out

    async def _run(self, binary: str, rules: Path, target: Path, experimental: bool,
                   home: str) -> dict | None:
        cmd = [binary, "scan", *(["--experimental"] if experimental else []), "--json",
               "--config", str(rules), "--metrics", "off", "--disable-version-check", "--quiet",
               "--timeout", str(int(SCAN_TIMEOUT_S)), str(target)]
        env = {**os.environ, **SEMGREP_ENV}
        env.setdefault("HOME", home)  # semgrep keeps settings under $HOME; a container may have none
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE,
                                                    stdin=asyncio.subprocess.DEVNULL, env=env)
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), SCAN_TIMEOUT_S + 5)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"semgrep did not finish within {SCAN_TIMEOUT_S + 5:g} s") from None
        try:
            report = json.loads(stdout)
        except ValueError:
            return None
        if not isinstance(report, dict) or "results" not in report:
            return None
        errors = [e for e in report.get("errors", []) if e.get("level") == "error"]
        if errors:
            raise RuntimeError(f"semgrep failed: {errors[0].get('message', errors[0])}")
        return report


# -- pii -------------------------------------------------------------------------------------------

PII_MODEL_ENV = "AGENT_MONITOR_PII_SPACY_MODEL"
PII_MODELS = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm")


def pii_model() -> str | None:
    """The installed spaCy model pii uses for names and places, or None (patterns only)."""
    import spacy.util

    named = os.environ.get(PII_MODEL_ENV)
    if named:
        if spacy.util.is_package(named) or Path(named).exists():
            return named
        raise DetectorUnavailable(f"{PII_MODEL_ENV}={named} is neither an installed spaCy model "
                                  "package nor a model folder")
    return next((m for m in PII_MODELS if spacy.util.is_package(m)), None)


def _offline_tldextract() -> None:
    """presidio's e-mail recognizer calls tldextract, which downloads the public-suffix list on
    first use: use the snapshot it ships instead."""
    try:
        from tldextract import tldextract as tld
    except ImportError:
        return
    tld.TLD_EXTRACTOR = tld.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)


class OfflinePII:
    """Stands in for invariant's ``PII_Analyzer`` (``detect_all(text, entities)``): presidio on a
    local spaCy pipeline, loaded on first use, never downloaded."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self._analyzer: Any = None
        self._lock = threading.Lock()
        self.model: str | None = None

    def analyzer(self) -> Any:
        # loading spaCy and presidio (native libraries, their own caches) is the project's code,
        # which the policy sandbox lets run even when a policy's first pii() call triggers it
        with self._lock, sandbox.trusted():
            if self._analyzer is None:
                try:
                    import spacy
                    from presidio_analyzer import AnalyzerEngine
                    from presidio_analyzer.nlp_engine import SpacyNlpEngine
                except ImportError as exc:
                    raise DetectorUnavailable(
                        f"pii needs presidio-analyzer and spaCy ({exc.name} is missing): "
                        "pip install 'agent-monitor[detectors]'") from None
                _offline_tldextract()
                self.model = pii_model()
                engine = SpacyNlpEngine(models=[{"lang_code": "en",
                                                 "model_name": self.model or "blank:en"}])
                # set before AnalyzerEngine sees it: presidio's load() would download a missing model
                # (presidio types nlp as None until its own load() fills it)
                engine.nlp = {"en": spacy.load(self.model) if self.model else spacy.blank("en")}  # type: ignore[assignment]
                self._analyzer = AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])
            return self._analyzer

    def detect_all(self, text: str, entities: list[str] | None = None) -> list[Any]:
        results = self.analyzer().analyze(text, language="en", entities=entities)
        return list({r for r in results if r.score > self.threshold})

    async def adetect(self, text: str, entities: list[str] | None = None) -> list[Any]:
        return self.detect_all(text, entities)


SEMGREP = OfflineSemgrep()
PII = OfflinePII()


def install() -> None:
    """Put the offline detectors behind invariant's ``semgrep`` and ``pii`` (idempotent, cheap:
    nothing is loaded until a policy calls one)."""
    global _installed
    with _lock:
        if _installed:
            return
        for key, value in SEMGREP_ENV.items():
            os.environ.setdefault(key, value)
        import importlib

        # (by module path: the package's names `pii` and `semgrep` are the functions, not modules)
        code: Any = importlib.import_module("invariant.analyzer.stdlib.invariant.detectors.code")
        pii: Any = importlib.import_module("invariant.analyzer.stdlib.invariant.detectors.pii")
        # both modules keep their detector in a global they create on first use: fill it first
        code.SEMGREP_DETECTOR = SEMGREP
        pii.PII_ANALYZER = PII
        _installed = True
