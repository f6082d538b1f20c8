"""Differential harness: the incremental engine against invariant-ai's own ``a_analyze_pending``.

Shared by the engine tests. For a policy, a trace and a split into batches it runs

- the reference: ``LocalPolicy.a_analyze_pending(past, pending)`` for every batch, the past being
  the whole trace before the batch (not its Monitor, not a window);
- the incremental engine batch by batch on its own state (passed through JSON between batches);

and reports every batch where the two differ: the set of (message, key), and, for rules whose
body calls no function, each violation's addresses (invariant then attaches to every error the
ranges of all matches, a known defect, so those are compared only where it is absent).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

os.environ.setdefault("LOCAL_POLICY", "1")
os.environ["INVARIANT_MAX_ITERATIONS"] = str(10**12)

from invariant.analyzer.language import ast as iast  # noqa: E402

from monitor.engine.base import EngineError, SessionState  # noqa: E402
from monitor.engine.incremental import IncrementalEngine  # noqa: E402
from monitor.policy import LoadedPolicy  # noqa: E402


def calls_function(rule: Any) -> bool:
    """Whether a rule's body or raise expression contains a function call."""
    found = False

    def walk(node: Any) -> None:
        nonlocal found
        if isinstance(node, iast.FunctionCall):
            found = True
        if isinstance(node, iast.Node):
            for name, value in vars(node).items():
                if name in ("location", "scope", "type", "id"):
                    continue
                for v in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(v, iast.Node):
                        walk(v)

    for expr in rule.body:
        walk(expr)
    walk(rule.exception_or_constructor)
    return found


def rules_of(policy: LoadedPolicy) -> list[Any]:
    return [s for s in policy.local.policy_root.statements if isinstance(s, iast.RaisePolicy)]


def _shape(matches: list[tuple[int, str, str, tuple]], exact_ranges: set[int]) -> Counter:
    out = Counter()
    for rule, message, key, addresses in matches:
        out[(message, key, addresses if rule in exact_ranges else None)] += 1
    return out


async def reference_batches(policy: LoadedPolicy, trace: list[dict],
                            bounds: list[int]) -> list[Any]:
    """Per batch: a list of (rule, message, key, addresses) or the string 'raises: ...'."""
    out = []
    start = 0
    for end in bounds:
        try:
            result = await policy.local.a_analyze_pending(trace[:start], trace[start:end])
        except Exception as exc:  # noqa: BLE001 - recorded, compared with the engine's failure
            out.append(f"raises: {type(exc).__name__}: {exc}")
            return out
        found = []
        for e in result.errors:
            rule = int(str(e.key).strip("()").split(",")[0])
            found.append((rule, " ".join(str(a) for a in e.args), str(e.key),
                          tuple("messages." + r.json_path for r in e.ranges)))
        out.append(found)
        start = end
    return out


async def incremental_batches(engine: IncrementalEngine, trace: list[dict],
                              bounds: list[int]) -> list[Any]:
    out = []
    state = engine.initial_state()
    start = 0
    for end in bounds:
        try:
            result = await engine.check(state, trace[start:end])
        except EngineError as exc:
            out.append(f"raises: {exc}")
            return out
        out.append([(m.rule_index, m.message, m.key, tuple(m.addresses)) for m in result.matches])
        # through JSON, as the worker's changelog carries it
        state = SessionState.model_validate_json(result.advance(state).model_dump_json())
        start = end
    return out


def differences(policy: LoadedPolicy, engine: IncrementalEngine, trace: list[dict],
                bounds: list[int], only_rules: set[int] | None = None) -> list[str]:
    """Human-readable differences between the engines for one split (empty when equal)."""
    ref = asyncio.run(reference_batches(policy, trace, bounds))
    inc = asyncio.run(incremental_batches(engine, trace, bounds))
    rules = rules_of(policy)
    exact = {i for i, r in enumerate(rules) if not calls_function(r)}
    problems = []
    for n, (a, b) in enumerate(zip(ref, inc, strict=False)):
        if isinstance(a, str) or isinstance(b, str):
            if isinstance(a, str) != isinstance(b, str):
                problems.append(f"batch {n} (bounds {bounds}): reference {a if isinstance(a, str) else 'ok'}"
                                f" / incremental {b if isinstance(b, str) else 'ok'}")
            break
        if only_rules is not None:
            a = [m for m in a if m[0] in only_rules]
            b = [m for m in b if m[0] in only_rules]
        sa, sb = {(m[1], m[2]) for m in a}, {(m[1], m[2]) for m in b}
        if sa != sb:
            problems.append(f"batch {n} (bounds {bounds}): (message, key) reference {sorted(sa)} "
                            f"!= incremental {sorted(sb)}")
            continue
        ca, cb = _shape(a, exact), _shape(b, exact)
        if ca != cb:
            problems.append(f"batch {n} (bounds {bounds}): ranges reference {sorted(ca.items(), key=str)}"
                            f" != incremental {sorted(cb.items(), key=str)}")
    if len(ref) != len(inc) and not problems:
        problems.append(f"bounds {bounds}: reference stopped after {len(ref)} batches, "
                        f"incremental after {len(inc)}")
    return problems


def splits(n: int, rng: Any | None = None) -> list[list[int]]:
    """Whole trace as one batch, one event per batch, and (with ``rng``) a random split."""
    out = [[n], list(range(1, n + 1))]
    if rng is not None and n > 1:
        cuts = sorted(rng.sample(range(1, n), rng.randint(1, n - 1)))
        out.append(cuts + [n])
    return [b for b in out if b]
