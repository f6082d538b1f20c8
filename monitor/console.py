"""Monitor records as lines of rich text: what ``tail``, ``produce --wait`` and the demo print.

Example::

    >>> from monitor.models import Verdict
    >>> render_verdict(Verdict(session_id="s1", batch_id="s1:0", decision="allow")).plain
    's1  #s1:0  ALLOW'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel

from monitor.models import Alert, DeadLetter, Verdict

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

SEVERITY_STYLE = {"low": "blue", "medium": "yellow", "high": "red", "critical": "bold red"}
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
    t.append(verdict.session_id, style="bold")
    t.append(f"  #{verdict.batch_id}  ")
    t.append(verdict.decision.upper(), style=DECISION_STYLE.get(verdict.decision, ""))
    if verdict.policy_version is not None:
        t.append(f"  {verdict.policy_id} v{verdict.policy_version}", style="dim")
    for v in verdict.violations:
        t.append("\n    ")
        t.append(f"[{v.severity}] ", style=SEVERITY_STYLE.get(v.severity, ""))
        if v.action == "log":
            t.append("logged ", style="yellow")  # the rule's action: listed, not blocking
        t.append(v.message)
        if v.addresses:
            t.append(f"  @ {', '.join(v.addresses)}", style="dim")
    if verdict.reason and not verdict.violations:
        t.append(f"  ({verdict.reason})", style="italic")
    if latency_ms is not None:
        t.append(f"  {latency_ms:.0f} ms", style="dim")
    if problem:
        t.append(f"\n    {problem}", style="bold red")
    return t


def render_alert(alert: Alert) -> Text:
    from rich.text import Text

    t = Text()
    t.append("ALERT ", style="bold magenta")
    t.append(f"[{alert.severity}] ", style=SEVERITY_STYLE.get(alert.severity, ""))
    t.append(f"{alert.session_id} #{alert.batch_id}  ", style="bold")
    t.append(alert.message)
    if alert.addresses:
        t.append(f"  @ {', '.join(alert.addresses)}", style="dim")
    t.append(f"  id {alert.alert_id[:12]}", style="dim")
    return t


def render_dead_letter(dead: DeadLetter) -> Text:
    from rich.text import Text

    t = Text()
    t.append("DEAD LETTER ", style="bold yellow")
    t.append(f"{dead.kind}  ", style="yellow")
    if dead.session_id:
        t.append(f"{dead.session_id} #{dead.batch_id or '?'}  ", style="bold")
    t.append(dead.reason)
    t.append(f"  from {dead.source.topic}[{dead.source.partition}]@{dead.source.offset}, {dead.size} bytes",
             style="dim")
    return t


def render_record(record: BaseModel) -> Text | str:
    """Any monitor record as a line of rich text (what ``agent-monitor tail`` prints)."""
    if isinstance(record, Alert):
        return render_alert(record)
    if isinstance(record, Verdict):
        return render_verdict(record)
    if isinstance(record, DeadLetter):
        return render_dead_letter(record)
    return record.model_dump_json()
