"""Workflow files: the schema, and validation that names ``file:line:column: what is wrong``.

A workflow file is written by a responder in a crisis, not by a programmer, so
every mistake is reported with the place it is at and what would be right,
and all mistakes of a file are reported at once.  The file is read with
ruamel.yaml in round-trip mode, which keeps the line and column of every key
and value.

Shape of a file (see ``workflows/library/*.yaml`` for commented examples)::

    workflow: disaster-default     # a name, shown in explain and on read items
    order: 100                     # files are tried in this order, then by file name
    pools:                         # who may read: a role and credential tags
      radiologists: {role: radiologist}
    on_call:                       # named people for the escalation ladder
      duty-radiologist: [dr.osei]
    rules:
      - name: ct-head-stat
        match: {modality: CT, body_part: [HEAD, BRAIN]}
        priority: stat
        sla_minutes: 30
        pool: radiologists
        escalation:
          - {at: 0.5, action: notify_pool}
          - {at: 1.0, action: mark_breached}
      - name: everything-else
        default: true
        priority: routine
        sla_minutes: 60
        pool: radiologists
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

PRIORITIES = {"stat": 0, "urgent": 1, "routine": 2}
ESCALATION_ACTIONS = ("notify_pool", "notify_on_call", "reopen", "mark_breached")
SYNC_PRIORITIES = ("high", "normal", "low")
# Roles a pool may name when the caller does not hand its own list.
DEFAULT_ROLES = ("radiologist", "neurologist")
MAX_FRACTION = 3.0  # a step may fire after the breach (e.g. call the medical director at 2x)

TOP_KEYS = ("workflow", "description", "order", "pools", "on_call", "rules")
RULE_KEYS = ("name", "description", "match", "default", "priority", "sla_minutes", "pool",
             "escalation", "actions", "continue")
MATCH_KEYS = ("modality", "body_part", "study_description", "series_description", "calling_ae",
              "institution", "patient_age", "time_of_day")
STEP_KEYS = ("at", "before_due_min", "action", "on_call", "pool")
POOL_KEYS = ("role", "tags", "description")
ACTION_KEYS = ("forward", "sync", "hold")
TIME_RE = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class WorkflowError(Exception):
    """A workflow file is invalid; ``problems`` are ``file:line:column: what`` strings."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Pool:
    """Readers allowed to claim an item: any of ``roles`` holding every one of ``tags``."""

    name: str
    roles: tuple[str, ...]
    tags: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "roles": list(self.roles), "tags": list(self.tags)}

    def admits(self, role: str, tags: Iterable[str]) -> bool:
        held = {t.strip().lower() for t in tags if t.strip()}
        return role in self.roles and all(t.lower() in held for t in self.tags)

    def describe(self) -> str:
        tags = f" with tags {', '.join(self.tags)}" if self.tags else ""
        return f"{self.name} ({' or '.join(self.roles)}{tags})"


DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
SHIFT_KEYS = ("who", "days", "from", "to")


@dataclass(frozen=True)
class Shift:
    """One window of an on-call rota: ``who`` in fallback order, on ``days`` (the day a
    shift starts; all days when empty) from ``start`` to ``end`` minutes after midnight,
    local time (an overnight shift has end <= start). No times: always."""

    who: tuple[str, ...]
    days: tuple[str, ...] = ()
    start: int | None = None
    end: int | None = None

    def covers(self, when: dt.datetime) -> bool:
        minutes = when.hour * 60 + when.minute
        today, yesterday = DAYS[when.weekday()], DAYS[(when.weekday() - 1) % 7]
        if self.start is None or self.end is None:
            return not self.days or today in self.days
        if self.start < self.end:
            return (not self.days or today in self.days) and self.start <= minutes < self.end
        if minutes >= self.start:  # the evening part, on the day the shift starts
            return not self.days or today in self.days
        return minutes < self.end and (not self.days or yesterday in self.days)

    def to_dict(self) -> dict[str, Any]:
        return {"who": list(self.who), "days": list(self.days), "start": self.start,
                "end": self.end}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Shift:
        return cls(tuple(d["who"]), tuple(d.get("days", ())), d.get("start"), d.get("end"))


def on_duty(shifts: Iterable[Shift], when: dt.datetime) -> tuple[str, ...]:
    """Who is on call at ``when``, in fallback order (the first covering window's people)."""
    for shift in shifts:
        if shift.covers(when):
            return shift.who
    return ()


@dataclass(frozen=True)
class Step:
    """One rung of an escalation ladder.

    ``at`` is a fraction of the SLA after the first instance arrived;
    ``before_due_min`` is minutes before the due time. Exactly one is set.
    """

    action: str
    at: float | None = None
    before_due_min: float | None = None
    on_call: str = ""
    pool: Pool | None = None
    recipients: tuple[str, ...] = ()  # resolved on-call user names
    shifts: tuple[Shift, ...] = ()  # the rota, when on_call names time windows

    def offset_s(self, sla_minutes: float) -> float:
        """Seconds after the first instance at which the step fires."""
        if self.at is not None:
            return self.at * sla_minutes * 60.0
        return (sla_minutes - (self.before_due_min or 0.0)) * 60.0

    def describe(self) -> str:
        when = (f"at {self.at:g} of the SLA" if self.at is not None
                else f"{self.before_due_min:g} min before due")
        target = {"notify_on_call": f" {self.on_call}", "reopen": f" to {self.pool.name}"
                  if self.pool else ""}.get(self.action, "")
        return f"{self.action}{target} {when}"


@dataclass(frozen=True)
class Match:
    """Conditions on a study; every condition given must hold."""

    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    study_description: re.Pattern | None = None
    series_description: re.Pattern | None = None
    calling_ae: tuple[str, ...] = ()
    institution: re.Pattern | None = None
    age_min: float | None = None
    age_max: float | None = None
    time_from: int | None = None  # minutes after midnight, local time
    time_to: int | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    line: int
    match: Match = field(default_factory=Match)
    default: bool = False
    priority: str | None = None
    sla_minutes: float | None = None
    pool: Pool | None = None
    escalation: tuple[Step, ...] | None = None
    actions: tuple[dict[str, Any], ...] = ()
    cont: bool = False
    description: str = ""


@dataclass(frozen=True)
class Workflow:
    name: str
    path: str
    order: int
    rules: tuple[Rule, ...]
    pools: dict[str, Pool]
    on_call: dict[str, tuple[str, ...]]
    sha256: str
    text: str
    description: str = ""
    rotas: dict[str, tuple[Shift, ...]] = field(default_factory=dict)

    @property
    def default_rule(self) -> Rule | None:
        return next((r for r in self.rules if r.default), None)


def _yaml() -> YAML:
    return YAML(typ="rt")


class _Checker:
    """Walks one parsed document and collects problems with their positions."""

    def __init__(self, path: str, roles: Iterable[str]):
        self.path = path
        self.roles = tuple(roles)
        self.problems: list[str] = []

    # -- positions ------------------------------------------------------------------
    def at_key(self, node: Any, key: Any) -> str:
        try:
            line, col = node.lc.key(key) if isinstance(node, CommentedMap) else node.lc.item(key)
            return f"{self.path}:{line + 1}:{col + 1}"
        except Exception:
            return self.at_node(node)

    def at_value(self, node: Any, key: Any) -> str:
        try:
            if isinstance(node, CommentedMap):
                line, col = node.lc.value(key)
            else:
                line, col = node.lc.item(key)
            return f"{self.path}:{line + 1}:{col + 1}"
        except Exception:
            return self.at_key(node, key)

    def at_node(self, node: Any) -> str:
        try:
            return f"{self.path}:{node.lc.line + 1}:{node.lc.col + 1}"
        except Exception:
            return f"{self.path}:1:1"

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    # -- typed getters --------------------------------------------------------------
    def unknown_keys(self, node: CommentedMap, allowed: tuple[str, ...], what: str) -> None:
        for key in node:
            if key not in allowed:
                self.fail(self.at_key(node, key),
                          f"unknown key {key!r} in {what} (allowed: {', '.join(allowed)})")

    def mapping(self, node: CommentedMap, key: str, what: str) -> CommentedMap | None:
        value = node.get(key)
        if value is None:
            return None
        if not isinstance(value, CommentedMap):
            self.fail(self.at_value(node, key), f"{what}: expected a mapping of keys, "
                                                f"got {_kind(value)}")
            return None
        return value

    def string(self, node: CommentedMap, key: str, what: str, required: bool = False) -> str | None:
        value = node.get(key)
        if value is None:
            if required:
                self.fail(self.at_node(node), f"{what}: {key!r} is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(self.at_value(node, key), f"{what}: expected a non-empty text, "
                                                f"got {_kind(value)}")
            return None
        return value.strip()

    def number(self, node: CommentedMap, key: str, what: str) -> float | None:
        value = node.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(self.at_value(node, key), f"{what}: expected a number, got {_kind(value)}")
            return None
        return float(value)

    def boolean(self, node: CommentedMap, key: str, what: str) -> bool:
        value = node.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            self.fail(self.at_value(node, key), f"{what}: expected true or false, "
                                                f"got {_kind(value)}")
            return False
        return value

    def strings(self, node: CommentedMap, key: str, what: str) -> tuple[str, ...]:
        """A text or a list of texts."""
        value = node.get(key)
        if value is None:
            return ()
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            self.fail(self.at_value(node, key), f"{what}: expected a text or a list of texts, "
                                                f"got {_kind(value)}")
            return ()
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item.strip():
                where = self.at_value(value, i) if isinstance(value, CommentedSeq) else \
                    self.at_value(node, key)
                self.fail(where, f"{what}: expected a text, got {_kind(item)}")
                continue
            out.append(item.strip())
        return tuple(out)

    def regex(self, node: CommentedMap, key: str, what: str) -> re.Pattern | None:
        text = self.string(node, key, what)
        if text is None:
            return None
        try:
            return re.compile(text, re.IGNORECASE)
        except re.error as e:
            self.fail(self.at_value(node, key), f"{what}: bad regular expression {text!r}: {e}")
            return None


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def parse(text: str, path: str | Path, roles: Iterable[str] = DEFAULT_ROLES) -> Workflow:
    """Validate a workflow document; return it or raise :class:`WorkflowError`."""
    path = str(path)
    try:
        doc = _yaml().load(text)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None) if isinstance(e, MarkedYAMLError) else None
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else f"{path}:1:1"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise WorkflowError([f"{where}: not valid YAML: {problem}"]) from None
    c = _Checker(path, roles)
    if not isinstance(doc, CommentedMap):
        raise WorkflowError([f"{path}:1:1: expected a mapping with 'workflow' and 'rules' keys"])
    c.unknown_keys(doc, TOP_KEYS, "the workflow")
    name = c.string(doc, "workflow", "workflow name", required=True) or Path(path).stem
    description = c.string(doc, "description", "description") or ""
    order = c.number(doc, "order", "order")
    pools = _pools(c, doc)
    on_call, rotas = _on_call(c, doc)
    rules = [_with_rotas(r, rotas) for r in _rules(c, doc, pools, on_call)]
    if c.problems:
        raise WorkflowError(sorted(c.problems, key=_position))
    return Workflow(
        name=name, path=path, order=int(order if order is not None else 100), rules=tuple(rules),
        pools=pools, on_call=on_call, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        text=text, description=description, rotas=rotas,
    )


def _with_rotas(rule: Rule, rotas: dict[str, tuple[Shift, ...]]) -> Rule:
    """notify_on_call steps carry their rota's windows (resolved when the step fires)."""
    if not rule.escalation:
        return rule
    return replace(rule, escalation=tuple(
        replace(st, shifts=rotas.get(st.on_call, ())) if st.action == "notify_on_call" else st
        for st in rule.escalation))


def _position(problem: str) -> tuple[int, int]:
    """(line, column) of a ``file:line:column: …`` problem, for reporting in file order."""
    m = re.search(r":(\d+):(\d+): ", problem)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def load(path: str | Path, roles: Iterable[str] = DEFAULT_ROLES) -> Workflow:
    """Read and validate one file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise WorkflowError([f"{path}:1:1: not UTF-8 text"]) from None
    except OSError as e:
        raise WorkflowError([f"{path}: cannot read: {e.strerror}"]) from None
    return parse(text, path, roles)


def _pools(c: _Checker, doc: CommentedMap) -> dict[str, Pool]:
    node = c.mapping(doc, "pools", "pools")
    out: dict[str, Pool] = {}
    for name in node or {}:
        spec = node[name]
        what = f"pool {name!r}"
        if not isinstance(name, str) or not NAME_RE.match(name):
            c.fail(c.at_key(node, name), f"{what}: a pool name is letters, digits, '-', '_', '.'")
            continue
        if not isinstance(spec, CommentedMap):
            c.fail(c.at_value(node, name), f"{what}: expected a mapping with 'role' and "
                                           f"optional 'tags', got {_kind(spec)}")
            continue
        c.unknown_keys(spec, POOL_KEYS, what)
        roles = c.strings(spec, "role", what)
        if not roles and "role" not in spec:
            c.fail(c.at_node(spec), f"{what}: 'role' is required "
                                    f"(one of: {', '.join(c.roles)})")
        for role in roles:
            if role not in c.roles:
                c.fail(c.at_value(spec, "role"),
                       f"{what}: unknown role {role!r} (roles: {', '.join(c.roles)})")
        tags = tuple(t.lower() for t in c.strings(spec, "tags", f"{what} tags"))
        out[name] = Pool(name, roles, tags)
    return out


def _on_call(c: _Checker, doc: CommentedMap) -> tuple[dict[str, tuple[str, ...]],
                                                     dict[str, tuple[Shift, ...]]]:
    """``name: [users]`` (all paged at once) or ``name: [{who, days, from, to}, …]`` (a rota:
    the first window covering the time pages its first person; the rest are the fallback)."""
    node = c.mapping(doc, "on_call", "on_call")
    out: dict[str, tuple[str, ...]] = {}
    rotas: dict[str, tuple[Shift, ...]] = {}
    for name in node or {}:
        value = node[name]
        if isinstance(value, CommentedSeq) and any(isinstance(v, CommentedMap) for v in value):
            shifts = tuple(s for i, v in enumerate(value)
                           if (s := _shift(c, value, i, f"on_call {name!r} window {i + 1}")))
            rotas[str(name)] = shifts
            out[str(name)] = tuple(dict.fromkeys(u for s in shifts for u in s.who))
            continue
        users = c.strings(node, name, f"on_call {name!r}")
        if not users and node[name] is None:
            c.fail(c.at_key(node, name), f"on_call {name!r}: name at least one user")
        out[str(name)] = users
    return out, rotas


def _shift(c: _Checker, seq: CommentedSeq, i: int, what: str) -> Shift | None:
    item = seq[i]
    if not isinstance(item, CommentedMap):
        c.fail(c.at_value(seq, i), f"{what}: expected {{who: [users], days: [mon…], from: "
                                   f"\"20:00\", to: \"08:00\"}}, got {_kind(item)}")
        return None
    c.unknown_keys(item, SHIFT_KEYS, what)
    who = c.strings(item, "who", f"{what} who")
    if not who:
        c.fail(c.at_node(item), f"{what}: name at least one user in 'who'")
    days = tuple(d.lower() for d in c.strings(item, "days", f"{what} days"))
    bad = [d for d in days if d not in DAYS]
    if bad:
        c.fail(c.at_value(item, "days"), f"{what}: unknown day(s) {', '.join(bad)} "
                                         f"(days: {', '.join(DAYS)})")
    start = end = None
    if ("from" in item) != ("to" in item):
        c.fail(c.at_node(item), f"{what}: give both 'from' and 'to', or neither (all day)")
    elif "from" in item:
        start, end = _clock(c, item, "from", what), _clock(c, item, "to", what)
    if not who or bad:
        return None
    return Shift(who, days, start, end)


def _rules(c: _Checker, doc: CommentedMap, pools: dict[str, Pool],
           on_call: dict[str, tuple[str, ...]]) -> list[Rule]:
    node = doc.get("rules")
    if node is None:
        c.fail(c.at_node(doc), "'rules' is required: a list of rules, the last one "
                               "usually 'default: true'")
        return []
    if not isinstance(node, CommentedSeq) or not node:
        c.fail(c.at_value(doc, "rules"), f"rules: expected a non-empty list of rules, "
                                         f"got {_kind(node)}")
        return []
    rules, names, default_seen = [], set(), False
    for i, item in enumerate(node):
        if not isinstance(item, CommentedMap):
            c.fail(c.at_value(node, i), f"rule {i + 1}: expected a mapping, got {_kind(item)}")
            continue
        rule = _rule(c, item, i, pools, on_call)
        if rule is None:
            continue
        if rule.name in names:
            c.fail(c.at_value(item, "name"), f"rule {rule.name!r}: a rule of that name "
                                             "already exists in this file")
        names.add(rule.name)
        if rule.default:
            if default_seen:
                c.fail(c.at_key(item, "default"), f"rule {rule.name!r}: only one rule may "
                                                  "be the default")
            default_seen = True
        rules.append(rule)
    return rules


def _rule(c: _Checker, node: CommentedMap, i: int, pools: dict[str, Pool],
          on_call: dict[str, tuple[str, ...]]) -> Rule | None:
    name = c.string(node, "name", f"rule {i + 1}", required=True) or f"rule-{i + 1}"
    what = f"rule {name!r}"
    c.unknown_keys(node, RULE_KEYS, what)
    default = c.boolean(node, "default", what)
    if default and "match" in node:
        c.fail(c.at_key(node, "match"), f"{what}: the default rule catches every study, "
                                        "it cannot have 'match'")
    priority = c.string(node, "priority", what)
    if priority is not None and priority not in PRIORITIES:
        c.fail(c.at_value(node, "priority"),
               f"{what}: priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    sla = c.number(node, "sla_minutes", f"{what} sla_minutes")
    if sla is not None and sla <= 0:
        c.fail(c.at_value(node, "sla_minutes"), f"{what}: sla_minutes must be greater than 0")
        sla = None
    pool = None
    pool_name = c.string(node, "pool", what)
    if pool_name is not None:
        pool = pools.get(pool_name)
        if pool is None:
            c.fail(c.at_value(node, "pool"), f"{what}: unknown pool {pool_name!r} "
                                             f"(pools: {', '.join(pools) or 'none defined'})")
    if default:
        for key in ("priority", "sla_minutes", "pool"):
            if key not in node:
                c.fail(c.at_node(node), f"{what}: the default rule must set {key!r}")
    match = _match(c, node, what)
    escalation = _ladder(c, node, what, sla, pools, on_call)
    actions = _actions(c, node, what)
    cont = c.boolean(node, "continue", what)
    if default and cont:
        c.fail(c.at_key(node, "continue"), f"{what}: the default rule cannot 'continue'")
    description = c.string(node, "description", what) or ""
    line = node.lc.line + 1
    return Rule(name=name, line=line, match=match, default=default, priority=priority,
                sla_minutes=sla, pool=pool, escalation=escalation, actions=actions, cont=cont,
                description=description)


def _match(c: _Checker, rule: CommentedMap, what: str) -> Match:
    node = c.mapping(rule, "match", f"{what} match")
    if node is None:
        return Match()
    what = f"{what} match"
    c.unknown_keys(node, MATCH_KEYS, what)
    age_min = age_max = t_from = t_to = None
    age = c.mapping(node, "patient_age", f"{what} patient_age")
    if age is not None:
        c.unknown_keys(age, ("min", "max"), f"{what} patient_age")
        age_min = c.number(age, "min", f"{what} patient_age min")
        age_max = c.number(age, "max", f"{what} patient_age max")
        if age_min is None and age_max is None:
            c.fail(c.at_value(node, "patient_age"), f"{what} patient_age: give min, max or both "
                                                    "(years)")
        if age_min is not None and age_max is not None and age_min > age_max:
            c.fail(c.at_value(age, "max"), f"{what} patient_age: max {age_max:g} is below "
                                           f"min {age_min:g}")
    tod = c.mapping(node, "time_of_day", f"{what} time_of_day")
    if tod is not None:
        c.unknown_keys(tod, ("from", "to"), f"{what} time_of_day")
        t_from = _clock(c, tod, "from", f"{what} time_of_day")
        t_to = _clock(c, tod, "to", f"{what} time_of_day")
    return Match(
        modality=tuple(m.upper() for m in c.strings(node, "modality", f"{what} modality")),
        body_part=tuple(b.upper() for b in c.strings(node, "body_part", f"{what} body_part")),
        study_description=c.regex(node, "study_description", f"{what} study_description"),
        series_description=c.regex(node, "series_description", f"{what} series_description"),
        calling_ae=c.strings(node, "calling_ae", f"{what} calling_ae"),
        institution=c.regex(node, "institution", f"{what} institution"),
        age_min=age_min, age_max=age_max, time_from=t_from, time_to=t_to,
    )


def _clock(c: _Checker, node: CommentedMap, key: str, what: str) -> int | None:
    value = node.get(key)
    m = TIME_RE.match(value.strip()) if isinstance(value, str) else None
    if m is None:
        c.fail(c.at_value(node, key) if key in node else c.at_node(node),
               f"{what}: {key!r} must be a time like \"07:30\" (in quotes), got {_kind(value)}")
        return None
    return int(m.group(1)) * 60 + int(m.group(2))


def _ladder(c: _Checker, rule: CommentedMap, what: str, sla: float | None,
            pools: dict[str, Pool], on_call: dict[str, tuple[str, ...]]) -> tuple[Step, ...] | None:
    node = rule.get("escalation")
    if node is None:
        return None
    what = f"{what} escalation"
    if not isinstance(node, CommentedSeq):
        c.fail(c.at_value(rule, "escalation"), f"{what}: expected a list of steps, "
                                               f"got {_kind(node)}")
        return None
    steps: list[Step] = []
    prev: tuple[float, int] | None = None
    for i, item in enumerate(node):
        swhat = f"{what} step {i + 1}"
        if not isinstance(item, CommentedMap):
            c.fail(c.at_value(node, i), f"{swhat}: expected a mapping with 'at' and 'action'")
            continue
        step = _step(c, item, swhat, pools, on_call)
        if step is None:
            continue
        # "Adds up": steps fire in the order written, within the ladder's range.
        key = _fraction(step, sla)
        if key is not None:
            where = c.at_value(item, "at" if step.at is not None else "before_due_min")
            if key <= 0:
                c.fail(where, f"{swhat}: fires at or before the first image "
                              f"({'before_due_min reaches past the SLA' if step.at is None else 'at must be > 0'})")
            elif key > MAX_FRACTION:
                c.fail(where, f"{swhat}: at {key:g} is beyond {MAX_FRACTION:g} times the SLA")
            if step.action == "mark_breached" and abs(key - 1.0) > 1e-9:
                c.fail(where, f"{swhat}: mark_breached must be at 1.0 (the due time), "
                              f"not {key:g}")
            if prev is not None and key <= prev[0]:
                c.fail(where, f"{swhat}: fires at {key:g} of the SLA, not after step "
                              f"{prev[1]} ({prev[0]:g}); list steps in the order they fire")
            prev = (key, i + 1)
        steps.append(step)
    if sum(1 for s in steps if s.action == "mark_breached") > 1:
        c.fail(c.at_value(rule, "escalation"), f"{what}: mark_breached appears more than once")
    return tuple(steps)


def _fraction(step: Step, sla: float | None) -> float | None:
    if step.at is not None:
        return step.at
    if sla is None:
        return None  # minutes before due: checked against the SLA the rule gets when applied
    return 1.0 - (step.before_due_min or 0.0) / sla


def _step(c: _Checker, item: CommentedMap, what: str, pools: dict[str, Pool],
          on_call: dict[str, tuple[str, ...]]) -> Step | None:
    c.unknown_keys(item, STEP_KEYS, what)
    at = c.number(item, "at", f"{what} at")
    before = c.number(item, "before_due_min", f"{what} before_due_min")
    if (at is None) == (before is None):
        if "at" not in item and "before_due_min" not in item:
            c.fail(c.at_node(item), f"{what}: give 'at' (a fraction of the SLA, e.g. 0.5) or "
                                    "'before_due_min' (minutes before due)")
        elif at is not None:
            c.fail(c.at_key(item, "before_due_min"), f"{what}: give 'at' or 'before_due_min', "
                                                     "not both")
        return None
    if before is not None and before < 0:
        c.fail(c.at_value(item, "before_due_min"), f"{what}: before_due_min must not be negative")
        return None
    action = c.string(item, "action", what, required=True)
    if action is None:
        return None
    if action not in ESCALATION_ACTIONS:
        c.fail(c.at_value(item, "action"), f"{what}: unknown action {action!r} "
                                           f"(actions: {', '.join(ESCALATION_ACTIONS)})")
        return None
    oc, pool, recipients = "", None, ()
    if action == "notify_on_call":
        oc = c.string(item, "on_call", what) or ""
        if not oc:
            c.fail(c.at_node(item), f"{what}: notify_on_call needs 'on_call: NAME' "
                                    f"(defined: {', '.join(on_call) or 'none'})")
        elif oc not in on_call:
            c.fail(c.at_value(item, "on_call"), f"{what}: unknown on_call {oc!r} "
                                                f"(defined: {', '.join(on_call) or 'none'})")
        recipients = on_call.get(oc, ())
    elif "on_call" in item:
        c.fail(c.at_key(item, "on_call"), f"{what}: 'on_call' belongs to notify_on_call steps")
    if action == "reopen":
        name = c.string(item, "pool", what)
        if not name:
            c.fail(c.at_node(item), f"{what}: reopen needs 'pool: NAME' (the wider pool)")
        elif name not in pools:
            c.fail(c.at_value(item, "pool"), f"{what}: unknown pool {name!r} "
                                             f"(pools: {', '.join(pools) or 'none defined'})")
        pool = pools.get(name or "")
    elif "pool" in item:
        c.fail(c.at_key(item, "pool"), f"{what}: 'pool' belongs to reopen steps")
    return Step(action=action, at=at, before_due_min=before, on_call=oc, pool=pool,
                recipients=recipients)


def _actions(c: _Checker, rule: CommentedMap, what: str) -> tuple[dict[str, Any], ...]:
    node = rule.get("actions")
    if node is None:
        return ()
    what = f"{what} actions"
    if not isinstance(node, CommentedSeq):
        c.fail(c.at_value(rule, "actions"), f"{what}: expected a list, got {_kind(node)}")
        return ()
    out = []
    for i, item in enumerate(node):
        if not isinstance(item, CommentedMap) or len(item) != 1:
            c.fail(c.at_value(node, i), f"{what} {i + 1}: expected one of "
                                        "'forward: AE', 'sync: high|normal|low', 'hold: true'")
            continue
        key = next(iter(item))
        value = item[key]
        if key not in ACTION_KEYS:
            c.fail(c.at_key(item, key), f"{what}: unknown action {key!r} "
                                        f"(actions: {', '.join(ACTION_KEYS)})")
        elif key == "forward" and not (isinstance(value, str) and 0 < len(value.strip()) <= 16):
            c.fail(c.at_value(item, key), f"{what}: forward needs an AE title (1-16 characters), "
                                          f"got {_kind(value)}")
        elif key == "sync" and value not in SYNC_PRIORITIES:
            c.fail(c.at_value(item, key), f"{what}: sync priority must be one of "
                                          f"{', '.join(SYNC_PRIORITIES)}, got {_kind(value)}")
        elif key == "hold" and value is not True:
            c.fail(c.at_value(item, key), f"{what}: write 'hold: true' to hold for manual triage")
        else:
            out.append({key: value.strip() if isinstance(value, str) else value})
    return tuple(out)
