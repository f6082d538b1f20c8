"""The HTML report in a real headless Chromium: the highlighted spans are in the rendered page."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import tempfile
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from monitor.replay import ReplayRequest, run_replay
from monitor.report import Report, highlight, render_html

CHROMIUM = "/usr/bin/chromium"

POLICY = '''raise "Must not call tool after user uses keyword" if:
    (msg: Message) -> (tool: ToolCall)
    msg.role == "user"
    "send" in msg.content
    tool is tool:send_email

raise "secret token in a tool argument [risk=critical]" if:
    (call: ToolCall)
    call is tool:post
    "tok_" in call.function.arguments.body
'''


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (installs Debian's chromium package)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout)


class Marks(HTMLParser):
    """Collects ``<mark>`` elements (address and text) and the event blocks flagged as evidence."""

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[tuple[str, str]] = []
        self.hit_events: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "mark" and "hit" in (a.get("class") or ""):
            self._in = a.get("data-address") or ""
            self.marks.append((self._in, ""))
        if tag == "div" and "hit-event" in (a.get("class") or ""):
            self.hit_events.append(a.get("data-address") or "")

    def handle_data(self, data):
        if self._in is not None:
            addr, text = self.marks[-1]
            self.marks[-1] = (addr, text + data)

    def handle_endtag(self, tag):
        if tag == "mark":
            self._in = None


def png_pixels_vary(path: Path) -> bool:
    """A real PNG whose decoded image data is not one flat colour."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    width = height = 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    assert width > 100 and height > 100
    return len(set(raw)) > 32


@pytest.fixture(scope="module")
def html_report(tmp_path_factory) -> tuple[Path, Report]:
    d = tmp_path_factory.mktemp("html")
    (d / "policy.gr").write_text(POLICY)
    traces = d / "traces"
    traces.mkdir()
    (traces / "leak.json").write_text(json.dumps([
        {"role": "user", "content": "Could you <send> the summary & the notes to Peter?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "send_email", "arguments": {"to": "peter"}}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "2", "type": "function", "function": {"name": "post", "arguments": {"body": "key tok_123 end"}}}]},
    ]))
    (traces / "fine.json").write_text(json.dumps([{"role": "user", "content": "hello"}]))
    out = d / "report.json"
    run_replay(ReplayRequest(inputs=[str(traces)], policy=str(d / "policy.gr"), out=str(out),
                             html=str(d / "report.html"), engine="reference", progress=False))
    return d / "report.html", Report.load(out)


def test_highlight_escapes_and_merges_overlaps():
    assert highlight("a<b>c", [(1, 4, "x"), (2, 5, "y")]) == \
        'a<mark class="hit" data-address="x y">&lt;b&gt;c</mark>'
    assert highlight("abc", [(5, 9, "out of range")]) == "abc"


def test_html_report_renders_in_chromium_with_highlighted_spans(html_report, tmp_path):
    page, report = html_report
    expected = {(e.address, e.text[e.start:e.end])
                for s in report.sessions for b in s.batches for e in b.evidence if e.start is not None}
    assert expected == {("messages.0.content:11-15", "send"), (
        "messages.1.tool_calls.0.function.arguments.body:4-8", "tok_")}  # the denied send_email never joined the past

    dom = chromium("--dump-dom", page.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = Marks()
    parsed.feed(dom.stdout)
    assert set(parsed.marks) == expected
    # whole-event addresses (the tool calls) are flagged as evidence blocks
    assert any("messages.1.tool_calls.0" in a for a in parsed.hit_events)
    # the user's markup was escaped, not rendered as an element
    assert "<send>" not in dom.stdout and "Could you &lt;" in dom.stdout
    assert re.search(r"Violations by rule", dom.stdout)

    shot = tmp_path / "report.png"
    res = chromium(f"--screenshot={shot}", "--window-size=1280,2000", page.resolve().as_uri())
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    assert png_pixels_vary(shot), "the screenshot is blank"


def test_html_lists_compare_and_bad_input(html_report):
    _, report = html_report
    text = render_html(report)
    assert "leak" in text and "fine" in text
    assert text.count('<mark class="hit"') == 2


def test_html_shows_the_comparison_with_another_policy(tmp_path):
    (tmp_path / "a.gr").write_text(POLICY)
    (tmp_path / "b.gr").write_text('raise "any post" if:\n    (call: ToolCall)\n    call is tool:post\n')
    (tmp_path / "t.json").write_text(json.dumps([
        {"role": "user", "content": "send it"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "send_email", "arguments": {}}}]}]))
    out = tmp_path / "r.json"
    run_replay(ReplayRequest(inputs=[str(tmp_path / "t.json")], policy=str(tmp_path / "a.gr"), out=str(out),
                             compare=str(tmp_path / "b.gr"), engine="reference", progress=False))
    text = render_html(Report.load(out))
    assert "Compared with policy b" in text and "1 sessions change verdict" in text
    assert "t: deny → allow" in text and "Must not call tool after user uses keyword @ messages.0" in text
