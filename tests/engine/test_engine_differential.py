"""Differential tests: the incremental engine gives invariant-ai's own verdicts.

1. Every policy in invariant-ai's own test suite (shipped in the wheel under ``invariant/tests``)
   that the engine compiles, on the traces those tests analyze: the suite is run once with a
   recorder plugin (cached in pytest's cache per invariant-ai version) to collect the pairs.
2. Property-based: generated policies of the supported shapes on generated traces.

Each trace is checked as one batch, event by event, and (hypothesis / seeded) random splits; every
batch must give what ``LocalPolicy.a_analyze_pending(past, pending)`` gives.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from engine_diff import differences, splits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.engine.incremental import IncrementalEngine
from monitor.policy import PolicyLoadError, load_policy_text

# detectors that reach the network or need models that are not installed: not run here
NETWORK = ("is_similar", "llm", "moderated", "prompt_injection", "pii", "semgrep", "fuzzy_contains",
           "get_file_content", "image", "ocr")
MAX_SUITE_TRACE = 30  # the reference is cubic in the trace; the suite's traces are small anyway

RECORDER = '''
import json, os
from invariant.analyzer import policy as _pol

_OUT = os.environ["ENGINE_CASES_OUT"]
_from_string = _pol.LocalPolicy.from_string.__func__
_analyze = _pol.LocalPolicy.a_analyze


def from_string(cls, string, *a, **kw):
    p = _from_string(cls, string, *a, **kw)
    p._src = string
    return p


async def a_analyze(self, input, raise_unhandled=False, function_cache=None, **params):
    src = getattr(self, "_src", None)
    if src is not None and not params:
        try:
            line = json.dumps({"policy": src, "trace": input})
        except (TypeError, ValueError):
            line = None
        if line:
            with open(_OUT, "a") as f:
                f.write(line + "\\n")
    return await _analyze(self, input, raise_unhandled, function_cache, **params)


_pol.LocalPolicy.from_string = classmethod(from_string)
_pol.LocalPolicy.a_analyze = a_analyze
'''


def _record_suite_cases(tmp: Path) -> list[dict]:
    import invariant

    suite = Path(invariant.__file__).parent / "tests"
    (tmp / "engine_case_recorder.py").write_text(RECORDER)
    out = tmp / "cases.jsonl"
    env = {**os.environ, "ENGINE_CASES_OUT": str(out), "LOCAL_POLICY": "1",
           "PYTHONPATH": str(tmp)}
    # files whose tests analyze nothing we can use (parser errors, image data not shipped)
    skip = ["test_images.py", "test_parser_errors.py", "test_html_parsing.py"]
    subprocess.run([sys.executable, "-m", "pytest", str(suite), "-q", "--tb=no",
                    "-p", "engine_case_recorder", "-p", "no:cacheprovider",
                    "--continue-on-collection-errors"]
                   + [f"--ignore={suite / 'analyzer' / f}" for f in skip],
                   cwd=tmp, env=env, capture_output=True, timeout=600)
    cases, seen = [], set()
    for line in out.read_text().splitlines() if out.exists() else []:
        case = json.loads(line)
        ident = json.dumps(case, sort_keys=True)
        if ident not in seen:
            seen.add(ident)
            cases.append(case)
    return cases


@pytest.fixture(scope="module")
def suite_cases(request, tmp_path_factory) -> list[dict]:
    key = f"agent-monitor/invariant-suite-cases/{version('invariant-ai')}"
    cases = request.config.cache.get(key, None)
    if not cases:
        cases = _record_suite_cases(tmp_path_factory.mktemp("suite"))
        request.config.cache.set(key, cases)
    return cases


def test_invariant_suite_policies_match_the_reference(suite_cases):
    assert len(suite_cases) > 100, "recording invariant-ai's test suite found too few cases"
    checked = compiled_rules = 0
    problems: list[str] = []
    engines: dict[str, tuple] = {}
    for n, case in enumerate(suite_cases):
        text, trace = case["policy"], case["trace"]
        if any(word in text for word in NETWORK) or not isinstance(trace, list) or \
                not all(isinstance(e, dict) for e in trace) or len(trace) > MAX_SUITE_TRACE:
            continue
        if text not in engines:
            try:
                policy = load_policy_text(text)
            except PolicyLoadError:
                engines[text] = (None, None, set())
                continue
            engine = IncrementalEngine(policy, offload=False)
            rules = {i.index for i in engine.explain() if i.engine == "incremental"}
            engines[text] = (policy, engine, rules)
            compiled_rules += len(rules)
        policy, engine, rules = engines[text]
        if not rules:
            continue
        checked += 1
        for bounds in splits(len(trace), random.Random(n)):
            found = differences(policy, engine, trace, bounds, only_rules=rules)
            if found:
                problems.append(f"policy:\n{text}\ntrace: {json.dumps(trace)[:400]}\n" + "\n".join(found))
                break
    # invariant-ai 0.3.5: 126 cases of 79 compiled rules; fewer means the compiler regressed
    assert checked >= 110 and compiled_rules >= 70, (checked, compiled_rules)
    assert not problems, "\n\n".join(problems[:5])


# -- property-based: generated policies of the supported shapes ------------------------------

WORDS = ["send", "Peter", "token", "hello", "report", "secret", "mail"]
TOOLS = ["send_email", "search", "create_pr"]

OWN = {
    "Message": [
        '{v}.role == "user"', '{v}.role in ["user", "assistant"]', '"{w}" in {v}.content',
        '{v}.content is not None', 'not ("{w}" in {v}.content)',
        '"{w}" in {v}.content or {v}.role == "assistant"',
        '{v}.content is not None and len({v}.content) > 12',
        'len({v}.content) > 12',  # raises on a message without content: the batch fails closed
        'any(["{w}" in {v}.content, "{w2}" in {v}.content])',
    ],
    "ToolCall": [
        '{v} is tool:{t}', '{v}.function.name == "{t}"', '{v}.function.name in ["{t}", "search"]',
        '"{w}" in {v}.function.arguments.arg', 'not ({v} is tool:{t})',
        '"{w}" in {v}.function.arguments.other',  # raises where the argument is missing
    ],
    "ToolOutput": ['"{w}" in {v}.content', '{v}.content is not None', '{v}.role == "tool"',
                   '{v} is tool:{t}',  # invariant follows the output to its call
                   'tool_call({v}).function.name == "{t}"'],
}
TEXT = {"Message": "{v}.content", "ToolOutput": "{v}.content", "ToolCall": "{v}.function.arguments.arg"}


@st.composite
def policies(draw) -> str:
    """One or two rules: 1-3 event variables, flow constraints, own and join conditions."""
    rules = []
    for r in range(draw(st.integers(1, 2))):
        n = draw(st.integers(1, 3))
        types = [draw(st.sampled_from(sorted(OWN))) for _ in range(n)]
        names = [f"{chr(97 + k)}{r}" for k in range(n)]
        lines = []
        declared = set()
        for k in range(1, n):
            if draw(st.booleans()):
                a = draw(st.integers(0, k - 1))
                op = draw(st.sampled_from(["->", "->", "~>"]))
                left = names[a] if a in declared else f"({names[a]}: {types[a]})"
                right = f"({names[k]}: {types[k]})"
                declared.update({a, k})
                lines.append(f"{left} {op} {right}")
        for k in range(n):
            if k not in declared:
                lines.insert(draw(st.integers(0, len(lines))), f"({names[k]}: {types[k]})")
        conds = []
        for k in range(n):
            for _ in range(draw(st.integers(0, 2))):
                conds.append(draw(st.sampled_from(OWN[types[k]])).format(
                    v=names[k], w=draw(st.sampled_from(WORDS)), w2=draw(st.sampled_from(WORDS)),
                    t=draw(st.sampled_from(TOOLS))))
        if n > 1 and draw(st.booleans()):
            a, b = draw(st.permutations(range(n)))[:2]
            w = draw(st.sampled_from(WORDS))
            ta, tb = TEXT[types[a]].format(v=names[a]), TEXT[types[b]].format(v=names[b])
            conds.append(draw(st.sampled_from([
                f'"{w}" in {ta} and "{w}" in {tb}',
                f'{ta} == {tb}',
                f'{ta} is not None and {tb} is not None and {ta} != {tb}',
            ])))
        message = draw(st.sampled_from([
            f'"rule {r}"', f'"rule {r} [risk=low]"',
            f'PolicyViolation("rule {r}", at={names[0]}.metadata.trace_idx)']))
        body = lines + conds
        rules.append(f"raise {message} if:\n" + "".join(f"    {line}\n" for line in body))
    return "\n".join(rules)


def _text(draw) -> str:
    return " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3))) + "."


@st.composite
def traces(draw, max_events: int) -> list[dict]:
    events = []
    calls = 0
    for _ in range(draw(st.integers(1, max_events))):
        kind = draw(st.sampled_from(["user", "assistant", "calls", "call", "output", "chunks"]))
        if kind in ("user", "assistant"):
            events.append({"role": kind, "content": _text(draw)})
        elif kind == "chunks":
            events.append({"role": draw(st.sampled_from(["user", "system"])), "content": [
                {"type": "text", "text": _text(draw)} for _ in range(draw(st.integers(1, 2)))]})
        elif kind == "calls":
            tcs = []
            for _ in range(draw(st.integers(1, 2))):
                calls += 1
                args = {"arg": _text(draw)}
                if draw(st.booleans()):
                    args["other"] = _text(draw)
                tcs.append({"id": f"c{calls}", "type": "function", "function": {
                    "name": draw(st.sampled_from(TOOLS)), "arguments": args}})
            events.append({"role": "assistant", "content": draw(st.sampled_from([None, "ok then."])),
                           "tool_calls": tcs})
        elif kind == "call":
            calls += 1
            events.append({"id": f"c{calls}", "type": "function", "function": {
                "name": draw(st.sampled_from(TOOLS)), "arguments": {"arg": _text(draw)}}})
        else:
            out = {"role": "tool", "content": _text(draw)}
            if calls and draw(st.booleans()):
                out["tool_call_id"] = f"c{draw(st.integers(1, calls))}"
            events.append(out)
    # JSON-decoded like records off Kafka (no string object shared between events)
    return json.loads(json.dumps(events))


@st.composite
def bounds_for(draw, n: int) -> list[int]:
    cuts = draw(st.sets(st.integers(1, max(1, n - 1)), max_size=n)) if n > 1 else set()
    return sorted(c for c in cuts if c < n) + [n]


_ENGINES: dict[str, tuple] = {}


def _engine(text: str):
    if text not in _ENGINES:
        policy = load_policy_text(text)
        _ENGINES[text] = (policy, IncrementalEngine(policy, offload=False))
    return _ENGINES[text]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(data=st.data())
def test_generated_policies_match_the_reference(data):
    text = data.draw(policies(), label="policy")
    policy, engine = _engine(text)
    assert all(i.engine == "incremental" for i in engine.explain()), engine.explain()
    trace = data.draw(traces(max_events=7), label="trace")
    bounds = data.draw(bounds_for(len(trace)), label="bounds")
    for split in (bounds, list(range(1, len(trace) + 1))):
        found = differences(policy, engine, trace, split)
        assert not found, "\n".join(found)
