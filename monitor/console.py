"""Monitor records as lines of rich text: what ``tail``, ``produce --wait`` and the demo print.

Example::

    >>> from monitor.models import Verdict
    >>> render_verdict(Verdict(session_id="s1", batch_id="s1:0", decision="allow")).plain
    's1  #s1:0  ALLOW'
"""

from __future__ import annotations

import re
import unicodedata
from typing import TYPE_CHECKING

from pydantic import BaseModel

from monitor.models import Alert, DeadLetter, Verdict

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

SEVERITY_STYLE = {"low": "blue", "medium": "yellow", "high": "red", "critical": "bold red"}


def printable(text: str, keep: str = "") -> str:
    r"""``text`` with every control, format (bidi included), surrogate, private-use or unassigned
    character, and line or paragraph separator, written as a Python escape: what a terminal or a
    page shows, never obeys (ids, messages, addresses and reasons come from agents). ``keep``:
    characters left as they are (the HTML report keeps line breaks and tabs).

    >>> printable("Leak \x1b[2J in \u202egnp.exe\u202c")
    'Leak \\x1b[2J in \\u202egnp.exe\\u202c'
    >>> printable("two\nlines ✓"), printable("two\nlines", keep="\n")
    ('two\\nlines ✓', 'two\nlines')
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if (cat[0] == "C" or cat in ("Zl", "Zp")) and ch not in keep:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def _json_escape(match: re.Match[str]) -> str:
    out = []
    for ch in match.group():
        n = ord(ch)
        if n < 0x10000:
            out.append(f"\\u{n:04x}")
        else:  # a UTF-16 surrogate pair, as JSON writes it
            n -= 0x10000
            out.append(f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}")
    return "".join(out)


# in JSON text: what JSON leaves raw but a terminal may obey (DEL, C1 controls, format characters
# such as bidi overrides, line and paragraph separators); JSON escapes C0 controls itself
_JSON_UNSAFE = re.compile(
    "[\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    "\ufeff\ufff9-\ufffb\U000110bd\U0001d173-\U0001d17a\U000e0001-\U000e007f]")


def printable_json(line: str) -> str:
    r"""A JSON text with the characters a terminal would obey written as ``\uXXXX`` escapes: the
    same JSON value, safe to print (``tail --json``, ``produce --wait --json``).

    >>> printable_json('{"session_id": "a\u202eb\x9b"}')
    '{"session_id": "a\\u202eb\\u009b"}'
    """
    return _JSON_UNSAFE.sub(_json_escape, line)
DECISION_STYLE = {"allow": "bold green", "deny": "bold red"}


def make_console(stderr: bool = False, width: int = 120, highlight: bool = False) -> Console:
    """A rich console; piped (CI logs, ``| tee``) it is ``width`` columns, not rich's 80."""
    from rich.console import Console

    console = Console(stderr=stderr, highlight=highlight)
    if not console.is_terminal:
        console.width = width
    return console


def render_verdict(verdict: Verdict, problem: str | None = None, expected: bool = False,
                   latency_ms: float | None = None) -> Text:
    """One verdict as a line of rich text: session, batch, decision, each violation with severity
    and addresses. With ``expected``, a leading mark says whether it met its expectation."""
    from rich.text import Text

    t = Text()
    if expected:
        t.append("✗ " if problem else "✓ ", style="bold red" if problem else "green")
    t.append(printable(verdict.session_id), style="bold")
    t.append(f"  #{printable(verdict.batch_id)}  ")
    t.append(verdict.decision.upper(), style=DECISION_STYLE.get(verdict.decision, ""))
    if verdict.policy_version is not None:
        t.append(f"  {verdict.policy_id} v{verdict.policy_version}", style="dim")
    for v in verdict.violations:
        t.append("\n    ")
        t.append(f"[{v.severity}] ", style=SEVERITY_STYLE.get(v.severity, ""))
        if v.action == "log":
            t.append("logged ", style="yellow")  # the rule's action: listed, not blocking
        t.append(printable(v.message))
        if v.addresses:
            t.append(f"  @ {printable(', '.join(v.addresses))}", style="dim")
    if verdict.reason and not verdict.violations:
        t.append(f"  ({printable(verdict.reason)})", style="italic")
    if latency_ms is not None:
        t.append(f"  {latency_ms:.0f} ms", style="dim")
    if problem:
        t.append(f"\n    {printable(problem)}", style="bold red")
    return t


def render_alert(alert: Alert) -> Text:
    from rich.text import Text

    t = Text()
    t.append("ALERT ", style="bold magenta")
    t.append(f"[{alert.severity}] ", style=SEVERITY_STYLE.get(alert.severity, ""))
    t.append(f"{printable(alert.session_id)} #{printable(alert.batch_id)}  ", style="bold")
    t.append(printable(alert.message))
    if alert.addresses:
        t.append(f"  @ {printable(', '.join(alert.addresses))}", style="dim")
    t.append(f"  id {alert.alert_id[:12]}", style="dim")
    return t


def render_dead_letter(dead: DeadLetter) -> Text:
    from rich.text import Text

    t = Text()
    t.append("DEAD LETTER ", style="bold yellow")
    t.append(f"{dead.kind}  ", style="yellow")
    if dead.session_id:
        t.append(f"{printable(dead.session_id)} #{printable(dead.batch_id or '?')}  ", style="bold")
    t.append(printable(dead.reason))
    t.append(f"  from {printable(dead.source.topic)}[{dead.source.partition}]@{dead.source.offset}, "
             f"{dead.size} bytes", style="dim")
    return t


def render_record(record: BaseModel) -> Text | str:
    """Any monitor record as a line of rich text (what ``agent-monitor tail`` prints)."""
    if isinstance(record, Alert):
        return render_alert(record)
    if isinstance(record, Verdict):
        return render_verdict(record)
    if isinstance(record, DeadLetter):
        return render_dead_letter(record)
    return printable_json(record.model_dump_json())
