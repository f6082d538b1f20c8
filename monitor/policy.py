"""Loading monitor policies from files: text, id, sha256, and errors a person can act on.

A policy is one Invariant policy file or a folder of them (``*.gr``, ``*.iv``, ``*.policy``,
read in name order). Policies are code: every load goes through the policy sandbox
(:mod:`monitor.sandbox`), which refuses imports outside invariant's builtins and detectors (plus
``--allow-import``) before anything is linked, and guards what linking runs.

Example::

    >>> from monitor.policy import load_policy_text
    >>> p = load_policy_text('raise "hi" if:\\n    (m: Message)\\n    "hi" in m.content\\n')
    >>> len(p.sha256)
    64
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor import sandbox
from monitor.errors import EXIT_USAGE, MonitorError
from monitor.models import Action, parse_action

POLICY_SUFFIXES = (".gr", ".iv", ".policy", ".inv")

# Importing invariant-ai is slow (~1 s); do it once, on first use.
os.environ.setdefault("LOCAL_POLICY", "1")


class PolicyLoadError(MonitorError, ValueError):
    """A policy file is missing, unreadable or does not parse; the message names file and line."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, path: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line


@dataclass
class LoadedPolicy:
    """A parsed, validated policy and what identifies it on the wire.

    ``version`` is the registry's version number (None for a policy from files); ``actions`` the
    per-rule actions a registry record sets (rule index -> ``block``/``log``), which override the
    ``[action=...]`` tags of the rules' messages (see :meth:`rule_actions`).
    """

    text: str
    policy_id: str
    sha256: str
    sources: list[str] = field(default_factory=list)
    _local: object | None = field(default=None, repr=False)
    version: int | None = None
    actions: dict[int, Action] = field(default_factory=dict)

    @property
    def local(self):  # -> invariant.analyzer.policy.LocalPolicy
        """invariant-ai's local evaluator for this policy (parsed once, then reused)."""
        if self._local is None:
            self._local = _parse(self.text, self.sources[0] if len(self.sources) == 1 else None)
        return self._local

    @property
    def rules(self) -> list[Any]:
        """The policy's rules (invariant's ``RaisePolicy`` statements), in rule-index order."""
        from invariant.analyzer.language.ast import RaisePolicy

        return [s for s in self.local.policy_root.statements if isinstance(s, RaisePolicy)]

    def rule_actions(self) -> dict[int, Action]:
        """What each rule's violations do: the record's action for the rule, else the ``[action=...]``
        tag of its message, else ``block``.

        >>> p = load_policy_text('raise "noisy [action=log]" if:\\n    (m: Message)\\n    "x" in m.content\\n'
        ...                      'raise "bad" if:\\n    (m: Message)\\n    "y" in m.content\\n')
        >>> p.rule_actions()
        {0: 'log', 1: 'block'}
        """
        return {i: self.actions.get(i) or parse_action(rule_message(rule)) or "block"
                for i, rule in enumerate(self.rules)}


def rule_message(rule: Any) -> str:
    """The message a rule (an invariant ``RaisePolicy``) raises, as ``policy explain`` shows it.

    ``raise "bad thing" if: ...`` and ``raise PolicyViolation("bad thing", x=1) if: ...`` both
    give ``bad thing``; a message that is an expression gives the expression.
    """
    from invariant.analyzer.language.ast import StringLiteral

    exc = rule.exception_or_constructor
    if type(exc) is StringLiteral:
        return str(exc.value)
    try:
        return str(exc.args[0].value)
    except (AttributeError, IndexError):
        return str(exc)


_LINE = re.compile(r"at line (\d+) col")
_FILE_LINE = re.compile(r"^File [^\n]*:(\d+)$", re.M)


_PARSED: dict[tuple[str, str | None, tuple[str, ...]], object] = {}


def _parse(text: str, path: str | None):
    """Parse once per (text, path, allowed imports): parsing costs 100-200 ms and a folder is read
    several ways."""
    key = (text, path, sandbox.allowed_imports())
    if key not in _PARSED:
        _PARSED[key] = _parse_uncached(text, path)
    return _PARSED[key]


def _parse_uncached(text: str, path: str | None):
    from invariant.analyzer.language.parser import parse
    from invariant.analyzer.policy import LocalPolicy

    from monitor.detectors import install

    install()  # semgrep and pii offline, before any policy can call them
    from invariant.analyzer.stdlib.invariant.errors import PolicyLoadingError

    where = path or "<policy>"
    try:
        root = parse(text, path, optimize_rules=False)
        if not root.errors:
            # before linking: linking imports (runs) every module the policy names
            refused = sandbox.refusals(root, text)
            if refused:
                raise PolicyLoadError(sandbox.describe(refused, where), path, refused[0].line)
        with sandbox.guarded():  # what linking runs is policy code too
            return LocalPolicy(root, symbol_table=sandbox.symbol_table())
    except PolicyLoadError:
        raise
    except PolicyLoadingError as exc:
        detail = str(exc).split("The following errors were found:", 1)[-1].strip()
        m = _FILE_LINE.search(detail) or _LINE.search(detail)
        line = int(m.group(1)) if m else None
        raise PolicyLoadError(
            f"{where}{f':{line}' if line else ''}: the policy does not parse:\n{detail}", path, line
        ) from None
    except Exception as exc:  # noqa: BLE001 - the parser raises many kinds; name them all
        raise PolicyLoadError(f"{where}: the policy could not be loaded: {type(exc).__name__}: {exc}",
                              path) from None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_policy_text(text: str, policy_id: str = "inline", source: str | None = None, *,
                     cache: bool = True) -> LoadedPolicy:
    """Parse policy text now, so that a bad policy is refused before anything runs.

    ``cache=False`` keeps the parse out of this module's cache, which never forgets: for texts
    from outside (the HTTP API), which keeps its own bounded cache.
    """
    return LoadedPolicy(text=text, policy_id=policy_id, sha256=sha256_text(text),
                        sources=[source] if source else [],
                        _local=_parse(text, source) if cache else _parse_uncached(text, source))


def policy_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise PolicyLoadError(f"{p}: no such policy file or folder", str(p))
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in POLICY_SUFFIXES and f.is_file())
        if not files:
            raise PolicyLoadError(
                f"{p}: the folder holds no policy files (expected {', '.join(POLICY_SUFFIXES)})", str(p)
            )
        return files
    return [p]


def read_policy_file(path: Path) -> str:
    """A policy file's text; PolicyLoadError names the file when it cannot be read."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyLoadError(f"{path}: cannot read the policy: {exc}", str(path)) from None


def load_policy(path: str | Path, policy_id: str | None = None) -> LoadedPolicy:
    """Load one policy file or a folder of them; each file is parsed on its own first so that an
    error names the right file and line.

    >>> load_policy("examples/policies/send_after_keyword.gr").policy_id
    'send_after_keyword'
    """
    files = policy_files(path)
    texts = []
    for f in files:
        text = read_policy_file(f)
        _parse(text, str(f))
        texts.append(text if text.endswith("\n") else text + "\n")
    text = "\n".join(texts)
    pid = policy_id or Path(path).stem
    return LoadedPolicy(text=text, policy_id=pid, sha256=sha256_text(text), sources=[str(f) for f in files],
                        _local=_parse(text, str(files[0])) if len(files) == 1 else None)


def parse_policies(path: str | Path) -> list[LoadedPolicy]:
    """Each policy file of ``path`` (a file, or a folder's files in name order) parsed once, as
    ``policy check`` and ``run`` validate before anything starts; a file that does not parse raises
    PolicyLoadError naming it and the line. (The worker then loads the full policy set.)

    >>> [p.policy_id for p in parse_policies(Path(__file__).parent.parent / "examples" / "policies")][:2]
    ['copyright', 'direct_succession']
    """
    return [load_policy_text(read_policy_file(f), policy_id=f.stem, source=str(f)) for f in policy_files(path)]


@dataclass
class PolicySet:
    """The policies a worker serves: one per file, selected by a batch's ``policy`` id.

    A batch without a ``policy`` id gets ``default``: the single file's policy, or every file of the
    folder combined (the folder's name is its id).

    >>> ps = PolicySet.single(load_policy_text('raise "x" if:\\n    (m: Message)\\n    "x" in m.content\\n',
    ...                                         policy_id="x"))
    >>> ps.resolve(None).policy_id, ps.resolve("x").policy_id
    ('x', 'x')
    """

    default: LoadedPolicy | None
    by_id: dict[str, LoadedPolicy] = field(default_factory=dict)
    # the id whose policy batches without one get, when it is served (a registry worker's
    # --default-policy; a file set's default is its own policy)
    default_id: str | None = None

    @classmethod
    def single(cls, policy: LoadedPolicy) -> "PolicySet":
        return cls(default=policy, by_id={policy.policy_id: policy})

    @classmethod
    def empty(cls, default_id: str | None = None) -> "PolicySet":
        """A set that :meth:`put` fills (a worker following the policy registry)."""
        return cls(default=None, default_id=default_id)

    def put(self, policy: LoadedPolicy) -> None:
        """Serve ``policy`` under its id from now on (a new version replaces the one before)."""
        self.by_id[policy.policy_id] = policy
        if policy.policy_id == (self.default_id or (self.default.policy_id if self.default else None)):
            self.default = policy

    def resolve(self, policy_id: str | None) -> LoadedPolicy:
        """The policy for a batch; raises KeyError naming the known ids for an unknown one."""
        default = self.default
        if default is not None and (policy_id is None or policy_id == default.policy_id):
            return default
        try:
            if policy_id is None:
                raise KeyError(policy_id)
            return self.by_id[policy_id]
        except KeyError:
            known = ", ".join(sorted({p.policy_id for p in self.all()})) or "none"
            if policy_id is None:
                raise KeyError(f"the batch names no policy and this worker has no default one (it serves: "
                               f"{known})") from None
            raise KeyError(f"unknown policy {policy_id!r} (this worker serves: {known})") from None

    def all(self) -> list[LoadedPolicy]:
        seen: dict[str, LoadedPolicy] = {self.default.policy_id: self.default} if self.default else {}
        seen.update(self.by_id)
        return list(seen.values())


def load_policy_set(path: str | Path) -> PolicySet:
    """A file gives one policy; a folder gives one policy per file plus all of them combined."""
    files = policy_files(path)
    if Path(path).is_file():
        return PolicySet.single(load_policy(path))
    by_id = {f.stem: load_policy(f) for f in files}
    combined = load_policy(path, policy_id=Path(path).name)
    return PolicySet(default=combined, by_id=by_id)
