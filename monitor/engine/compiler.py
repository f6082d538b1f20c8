"""Compiling invariant-ai rules (its own parsed AST) into incremental matchers.

A rule compiles when its body is a flat list of

- variable declarations ``(v: Message)``, ``(v: ToolCall)``, ``(v: ToolOutput)``,
- flow constraints ``a -> b`` / ``a ~> b`` between declared variables (declaring or not),
- conditions: any expression invariant can evaluate on the bound variables alone (member access,
  ``in``, comparisons, ``and/or/not``, ``is tool:name``, literals, ``len``/``any``/``empty``,
  imported detectors such as ``secrets(...)``), each using at least one variable.

Also compiled: ``:=`` from one variable, one list comprehension, predicates
(``name(x) := ...``) that cannot reach the trace, tool outputs used as objects (``out is
tool:x``, ``tool_call(out)``: linked to their call as invariant links them).

Everything else (quantifiers, user predicates declaring variables over the trace, ``input.*``,
variables declared inside an expression, arrows inside expressions, conditions without a
variable, a join condition placed before a flow constraint) makes the
rule run on the reference engine, with the reason recorded for ``policy explain``.

Example::

    >>> from monitor.policy import load_policy_text
    >>> from monitor.engine.compiler import compile_policy
    >>> p = load_policy_text('raise "x" if:\\n    (m: Message) -> (t: ToolCall)\\n'
    ...                      '    "send" in m.content\\n    t is tool:send_email\\n')
    >>> [r.compiled is not None for r in compile_policy(p)]
    [True]
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from invariant.analyzer.language import ast
from invariant.analyzer.language.scope import InputData, VariableDeclaration
from invariant.analyzer.runtime.evaluation import Interpreter, Unknown

from monitor import sandbox
from monitor.engine.conditions import DirectContext, compile_fast
from monitor.engine.support import rule_message
from monitor.errors import MonitorError
from monitor.policy import LoadedPolicy

SUPPORTED_TYPES = ("Message", "ToolCall", "ToolOutput")

DECL, ARROW, OWN, JOIN = "decl", "arrow", "own", "join"


class Unsupported(MonitorError):
    """A construct the incremental compiler does not handle; the message says which and where."""


@dataclass
class Var:
    decl: VariableDeclaration
    name: str
    type: str
    index: int


@dataclass
class Cond:
    """One position of the rule body."""

    kind: str  # DECL, ARROW, OWN (one variable) or JOIN (several)
    pos: int
    expr: Any = None
    vars: tuple[int, ...] = ()
    direct: bool = False  # for ARROW: ~> (directly preceding) rather than ->
    fast: Any = None  # plain-Python evaluator for common shapes (conditions.compile_fast)


@dataclass
class CompiledRule:
    index: int
    vars: list[Var]
    conds: list[Cond]
    globals: Any
    message: str | None  # the raise's string literal, or None when it is an expression
    raise_expr: Any = None
    never: bool = False  # invariant's first pass already rules the body out
    # per variable: 0 = its past candidates are never needed, k > 0 = only the last k flow
    # positions are, None = every past candidate may still be needed
    keep: list[int | None] = field(default_factory=list)
    needs_object: set[int] = field(default_factory=set)  # variables whose event must be kept
    links_outputs: bool = False  # own conditions use a tool output's linked call

    def own_conds(self, v: int) -> list[Cond]:
        return [c for c in self.conds if c.kind == OWN and c.vars == (v,)]

    def describe(self) -> str:
        names = ", ".join(f"{v.name}: {v.type}" for v in self.vars)
        if self.never:
            return (f"compiled: variables ({names}), but invariant's first pass already decides "
                    "the body without binding them, so no pending batch is ever reported")
        kept = []
        for v, k in zip(self.vars, self.keep, strict=False):
            kept.append(f"{v.name}: " + ("none" if k == 0 else "all candidates" if k is None
                                          else f"last {k} position(s)"))
        joins = sum(1 for c in self.conds if c.kind == JOIN)
        return (f"compiled: variables ({names}); state keeps {'; '.join(kept)}"
                + (f"; {joins} join condition(s) evaluated on kept candidates" if joins else ""))


@dataclass
class RulePlan:
    index: int
    message: str
    compiled: CompiledRule | None
    reason: str


def _line(node: Any) -> str:
    loc = getattr(node, "location", None)
    return f" (line {loc.line})" if loc is not None and getattr(loc, "line", None) else ""


def _children(node: Any) -> list[Any]:
    out = []
    for name, value in vars(node).items():
        if name in ("location", "scope", "type", "id"):
            continue
        if isinstance(value, ast.Node):
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(v for v in value if isinstance(v, ast.Node))
    return out


def _type_name(type_ref: Any) -> str:
    return getattr(type_ref, "name", type_ref) if not isinstance(type_ref, str) else type_ref


def _scan(node: Any, varmap: dict[int, Var], globals_: Any, used: set[int], parent: Any = None,
          is_raise: bool = False, assigned: dict[int, set[int]] | None = None,
          via: set[int] | None = None, links: set[int] | None = None) -> None:
    """Collect the variables ``node`` uses (``via``: the ``:=`` variables it reads); raise
    :class:`Unsupported` for constructs we leave to the reference engine."""
    assigned = assigned if assigned is not None else {}
    if isinstance(node, ast.TypedIdentifier):
        raise Unsupported(f"a variable declared inside an expression{_line(node)}")
    if isinstance(node, ast.Quantifier):
        raise Unsupported(f"a quantifier{_line(node)} ranges over the whole trace")
    if isinstance(node, ast.BinaryExpr) and node.op in ("->", "~>"):
        raise Unsupported(f"'{node.op}' inside an expression{_line(node)}")
    if isinstance(node, ast.BinaryExpr) and node.op == ":=":
        raise Unsupported(f"an assignment ':='{_line(node)}")
    if isinstance(node, (ast.SomeExpr, ast.ValueReference)):
        raise Unsupported(f"{type(node).__name__}{_line(node)}")
    if isinstance(node, ast.Identifier):
        decl = node.id
        if id(decl) in assigned:
            used.update(assigned[id(decl)])
            if via is not None:
                via.add(id(decl))
            return
        if id(decl) in varmap:
            var = varmap[id(decl)]
            used.add(var.index)
            bare = not (isinstance(parent, ast.MemberAccess) and parent.expr is node)
            if bare and var.type == "ToolOutput":
                # invariant links a tool output to its call anywhere in the trace (`_tool_call`):
                # the engine links it when the output arrives and keeps the link with the output
                if links is None:
                    raise Unsupported(f"the tool output '{var.name}' used as an object in the "
                                      f"raise expression{_line(node)}")
                links.add(var.index)
            return
        if decl is not None and decl in globals_.keys():
            value = globals_[decl]
            if value is InputData:
                raise Unsupported(f"policy parameters 'input'{_line(node)}")
            if isinstance(value, ast.Declaration) and not value.is_constant:
                _check_predicate(value, node.name, globals_, set())
            elif isinstance(value, ast.Declaration):
                _scan_const(value, globals_)
        return
    for child in _children(node):
        _scan(child, varmap, globals_, used, node, is_raise, assigned, via, links)


def _check_predicate(decl: Any, name: str, globals_: Any, seen: set[int]) -> None:
    """A predicate is compiled in place when it cannot reach the trace: invariant evaluates its
    body over the whole input, which only matters for variables without a given domain
    (``(x: ToolCall)``), quantifiers, flow and ``input``; ``(x: str) in values`` is fine."""
    if id(decl) in seen:
        return
    seen.add(id(decl))

    def walk(node: Any, parent: Any) -> None:
        if isinstance(node, ast.TypedIdentifier):
            given = isinstance(parent, ast.BinaryExpr) and parent.op == "in" and parent.left is node
            if not given:
                raise Unsupported(f"the predicate '{name}' declares a variable over the trace"
                                  f"{_line(node)}")
            return
        if isinstance(node, ast.Quantifier) or (isinstance(node, ast.BinaryExpr)
                                                and node.op in ("->", "~>")):
            raise Unsupported(f"the predicate '{name}' uses flow or a quantifier{_line(node)}")
        if isinstance(node, (ast.SomeExpr, ast.ValueReference)):
            raise Unsupported(f"the predicate '{name}' uses {type(node).__name__}{_line(node)}")
        if isinstance(node, ast.Identifier) and node.id is not None and node.id in globals_.keys():
            value = globals_[node.id]
            if value is InputData:
                raise Unsupported(f"the predicate '{name}' reads policy parameters{_line(node)}")
            if isinstance(value, ast.Declaration) and not value.is_constant:
                _check_predicate(value, node.name, globals_, seen)
            return
        for child in _children(node):
            walk(child, node)

    for expr in decl.value if isinstance(decl.value, list) else [decl.value]:
        walk(expr, None)


def _comprehensions(node: Any) -> list[Any]:
    found = [node] if isinstance(node, ast.ListComprehension) else []
    for child in _children(node):
        found.extend(_comprehensions(child))
    return found


def _scan_const(decl: Any, globals_: Any) -> None:
    for expr in decl.value if isinstance(decl.value, list) else [decl.value]:
        _scan(expr, {}, globals_, set())


def _first_pass(rule: Any, globals_: Any, symbol_table: Any) -> tuple[bool, list[Any]]:
    """invariant's first pass over a body with no variable bound: whether it goes on to bind the
    variables (only when the body is still unknown, or true while the raise needs a variable;
    otherwise the reference yields at most a model without events, never reported for a
    pending batch) and the domains it found."""

    async def run() -> tuple[bool, list[Any]]:
        ctx = DirectContext(symbol_table)
        result, domains = await Interpreter.eval(rule.body, {}, globals_, evaluation_context=ctx,
                                                 return_variable_domains=True, assume_bool=True)
        explores = result is Unknown
        if result is True:
            action = await Interpreter.eval(rule.exception_or_constructor, {}, globals_,
                                            partial=True, evaluation_context=ctx)
            explores = action is Unknown
        return explores, list(domains.items())

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            with sandbox.guarded():  # the first pass runs the policy's code: in the sandbox
                box["value"] = asyncio.run(run())
        except BaseException as exc:  # noqa: BLE001 - reported as a reason to fall back
            box["error"] = exc

    t = threading.Thread(target=target, name="policy-first-pass")
    t.start()
    t.join()
    if "error" in box:
        raise Unsupported(f"the body raises before any variable is bound: {box['error']!r}")
    value: tuple[bool, list[Any]] = box["value"]
    return value


def _keep(n: int, arrows: list[tuple[int, int, bool]]) -> list[int | None]:
    """How much of each variable's past the rule can still need (see CompiledRule.keep)."""
    before: dict[int, set[int]] = {v: set() for v in range(n)}
    for a, b, _ in arrows:
        before[b].add(a)
    changed = True
    while changed:  # transitive closure of "must come before"
        changed = False
        for v in range(n):
            extra = set().union(*(before[u] for u in before[v])) - before[v] if before[v] else set()
            if extra:
                before[v] |= extra
                changed = True
    keep: list[int | None] = [0 if before[v] >= set(range(n)) - {v} else None for v in range(n)]
    changed = True
    while changed:
        changed = False
        for a, b, direct in arrows:
            keep_a, keep_b = keep[a], keep[b]
            if direct and keep_b is not None and keep_a != 0:
                k = keep_b + 1
                if keep_a is None or k < keep_a:
                    keep[a] = k
                    changed = True
    return keep


def compile_rule(index: int, rule: Any, globals_: Any, symbol_table: Any) -> CompiledRule:
    """Compile one ``RaisePolicy``; raises :class:`Unsupported` with the reason otherwise."""
    varlist: list[Var] = []
    varmap: dict[int, Var] = {}

    def declare(node: Any) -> int:
        if id(node.id) in varmap:
            raise Unsupported(f"the variable '{node.name}' is declared twice{_line(node)}")
        tname = _type_name(node.type_ref)
        if tname not in SUPPORTED_TYPES:
            raise Unsupported(f"variables of type {tname}{_line(node)}")
        var = Var(node.id, node.name, tname, len(varlist))
        varlist.append(var)
        varmap[id(node.id)] = var
        return var.index

    def ref(node: Any) -> int:
        if isinstance(node, ast.TypedIdentifier):
            return declare(node)
        if isinstance(node, ast.Identifier) and id(node.id) in varmap:
            return varmap[id(node.id)].index
        raise Unsupported(f"a flow operand that is not a declared event variable{_line(node)}")

    # declarations first (a condition may name a variable declared on a later line)
    for expr in rule.body:
        if isinstance(expr, ast.TypedIdentifier):
            declare(expr)
        elif isinstance(expr, ast.BinaryExpr) and expr.op in ("->", "~>"):
            for side in (expr.left, expr.right):
                if isinstance(side, ast.TypedIdentifier):
                    declare(side)
    varmap_declared = dict(varmap)
    varlist.clear()
    varmap.clear()
    for v in sorted(varmap_declared.values(), key=lambda v: v.index):
        varlist.append(v)
        varmap[id(v.decl)] = v

    conds: list[Cond] = []
    arrows: list[tuple[int, int, bool]] = []
    assigned: dict[int, set[int]] = {}
    links: set[int] = set()  # tool-output variables whose call invariant links (`_tool_call`)
    # invariant leaks the loop variable of the first list comprehension it evaluates into the
    # assignment (and later writes go to a copy of the store): keep to one comprehension, and no
    # ':=' from it on, where that is simple to mirror
    comp_pos = [pos for pos, expr in enumerate(rule.body) for _ in _comprehensions(expr)]
    if len(comp_pos) > 1:
        raise Unsupported("more than one list comprehension in a rule body")
    for pos, expr in enumerate(rule.body):
        if isinstance(expr, ast.TypedIdentifier):
            conds.append(Cond(DECL, pos))
        elif isinstance(expr, ast.BinaryExpr) and expr.op in ("->", "~>"):
            a = varmap[id(expr.left.id)].index if isinstance(expr.left, ast.Identifier) and id(
                expr.left.id) in varmap else ref(expr.left)
            b = varmap[id(expr.right.id)].index if isinstance(expr.right, ast.Identifier) and id(
                expr.right.id) in varmap else ref(expr.right)
            conds.append(Cond(ARROW, pos, expr, (a, b), expr.op == "~>"))
            arrows.append((a, b, expr.op == "~>"))
        elif isinstance(expr, ast.BinaryExpr) and expr.op == ":=":
            if not isinstance(expr.left, ast.Identifier) or id(expr.left.id) in varmap:
                raise Unsupported(f"an assignment to something other than a new name{_line(expr)}")
            if comp_pos and pos >= comp_pos[0]:
                raise Unsupported(f"an assignment ':=' after a list comprehension{_line(expr)}")
            used: set[int] = set()
            _scan(expr.right, varmap, globals_, used, assigned=assigned, links=links)
            if len(used) != 1:
                raise Unsupported(f"an assignment ':=' not from exactly one variable{_line(expr)}")
            assigned[id(expr.left.id)] = set(used)
            conds.append(Cond(OWN, pos, expr, tuple(sorted(used))))
        else:
            used = set()
            via: set[int] = set()
            linked: set[int] = set()
            _scan(expr, varmap, globals_, used, assigned=assigned, via=via, links=linked)
            if not used:
                raise Unsupported(f"a condition without an event variable{_line(expr)}")
            kind = OWN if len(used) == 1 else JOIN
            links |= linked
            if kind == JOIN and via:
                raise Unsupported(f"a condition joining variables reads a ':=' name{_line(expr)}")
            fast = compile_fast(expr, {id(v.decl) for v in varlist})
            conds.append(Cond(kind, pos, expr, tuple(sorted(used)), fast=fast))
    if not varlist:
        raise Unsupported("a rule without event variables (never reported for a pending batch)")
    # pruning by flow is only exact when no join condition (which may raise) comes earlier
    first_join = min((c.pos for c in conds if c.kind == JOIN), default=None)
    if first_join is not None and any(c.pos > first_join for c in conds if c.kind == ARROW):
        raise Unsupported("a flow constraint after a condition joining several variables")

    exc = rule.exception_or_constructor
    message = exc.value if type(exc) is ast.StringLiteral else None
    needs: set[int] = set()
    for c in conds:
        if c.kind == JOIN:
            needs.update(c.vars)
    if message is None:
        used, via = set(), set()
        _scan(exc, varmap, globals_, used, is_raise=True, assigned=assigned, via=via, links=links)
        if via:
            raise Unsupported("the raise expression reads a ':=' name")
        needs.update(range(len(varlist)))  # the raise expression sees every variable

    explores, domains = _first_pass(rule, globals_, symbol_table)
    never = not explores
    if not never:
        found = [d for d, _ in domains]
        if set(map(id, found)) != set(id(v.decl) for v in varlist) or any(
                dom.values is not None for _, dom in domains):
            raise Unsupported("invariant's first pass finds other variables than declared")

    return CompiledRule(index=index, vars=varlist, conds=conds, globals=globals_, message=message,
                        raise_expr=None if message is not None else exc, never=never,
                        keep=_keep(len(varlist), arrows), needs_object=needs,
                        links_outputs=bool(links))


def compile_policy(policy: LoadedPolicy) -> list[RulePlan]:
    """One plan per rule of a policy, in rule-index order."""
    local = policy.local
    rule_objs = local.rule_set.rules
    plans = []
    for i, rule in enumerate(policy.rules):
        globals_ = rule_objs[i].globals
        try:
            compiled = compile_rule(i, rule, globals_, local.rule_set.symbol_table)
            plans.append(RulePlan(i, rule_message(rule), compiled, compiled.describe()))
        except Unsupported as exc:
            plans.append(RulePlan(i, rule_message(rule), None, str(exc)))
    return plans
