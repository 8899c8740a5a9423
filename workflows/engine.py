"""Rule matching: which rule applies to a study, and why every other rule did not.

The engine is pure: it gets the study's attributes (:class:`StudyFacts`) and
the loaded workflows, and returns a :class:`Decision` with a trace that
``appliance workflow explain`` prints.  Files are tried in ``order`` then by
file name; inside a file, rules in the order written.  The first match wins
unless it says ``continue: true``: then later matching rules may override the
priority, SLA, pool and ladder they set and add their actions.  When nothing
matches, the default rule of the file tried last (the highest ``order``: the
site's base file) catches the study, and when no workflow is
loaded at all the built-in fallback does, so no study is ever left unrouted.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from workflows.schema import PRIORITIES, Match, Pool, Rule, Step, Workflow

# Used only when no workflow file is loaded at all: route everything, loudly.
FALLBACK_POOL = Pool("all-readers", ("radiologist", "neurologist"))
FALLBACK_RULE = Rule(
    name="built-in-fallback", line=0, default=True, priority="routine", sla_minutes=60.0,
    pool=FALLBACK_POOL,
    escalation=(Step("notify_pool", at=0.5), Step("mark_breached", at=1.0)),
)


@dataclass(frozen=True)
class StudyFacts:
    """What a workflow may look at, read from the index (or from files for explain)."""

    study_uid: str
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    study_description: str = ""
    series_descriptions: tuple[str, ...] = ()
    calling_ae: str = ""
    institution: str = ""
    age_years: float | None = None
    received_at: float = 0.0  # epoch seconds of the first instance

    def local_minutes(self) -> int:
        t = dt.datetime.fromtimestamp(self.received_at)
        return t.hour * 60 + t.minute


@dataclass
class RuleTrace:
    workflow: str
    rule: str
    line: int
    matched: bool
    reasons: list[str]
    applied: bool = False
    note: str = ""


@dataclass
class Decision:
    priority: str
    sla_minutes: float
    pool: Pool
    escalation: tuple[Step, ...]
    actions: list[dict[str, Any]]
    workflow: str
    rule: str
    workflow_sha: str = ""
    trace: list[RuleTrace] = field(default_factory=list)

    @property
    def priority_rank(self) -> int:
        return PRIORITIES[self.priority]

    @property
    def hold(self) -> bool:
        return any(a.get("hold") for a in self.actions)

    def due_at(self, first_received: float) -> float:
        return first_received + self.sla_minutes * 60.0

    def step_times(self, first_received: float) -> list[tuple[int, float, Step]]:
        """(index, fire time, step) for the ladder; a breach step is always present."""
        steps = list(self.escalation)
        if not any(s.action == "mark_breached" for s in steps):
            steps.append(Step("mark_breached", at=1.0))
        timed = [(first_received + max(0.0, s.offset_s(self.sla_minutes)), s) for s in steps]
        return [(i, t, s) for i, (t, s) in enumerate(sorted(timed, key=lambda x: x[0]))]


def _in(values: Sequence[str], allowed: Sequence[str], label: str) -> tuple[bool, str]:
    have = [v for v in values if v]
    hit = [v for v in have if v.upper() in allowed]
    shown = ", ".join(have) or "(none)"
    if hit:
        return True, f"{label} {shown} is one of {', '.join(allowed)}"
    return False, f"{label} {shown} is not one of {', '.join(allowed)}"


def _search(pattern: re.Pattern, values: Sequence[str], label: str) -> tuple[bool, str]:
    have = [v for v in values if v]
    for v in have:
        if pattern.search(v):
            return True, f"{label} {v!r} matches /{pattern.pattern}/"
    shown = ", ".join(repr(v) for v in have) or "(empty)"
    return False, f"{label} {shown} does not match /{pattern.pattern}/"


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def check(match: Match, facts: StudyFacts) -> tuple[bool, list[str]]:
    """Evaluate every condition (not just up to the first failure) so explain can say all."""
    results: list[tuple[bool, str]] = []
    if match.modality:
        results.append(_in(facts.modalities, match.modality, "modality"))
    if match.body_part:
        results.append(_in(facts.body_parts, match.body_part, "body part"))
    if match.study_description is not None:
        results.append(_search(match.study_description, [facts.study_description],
                               "study description"))
    if match.series_description is not None:
        results.append(_search(match.series_description, facts.series_descriptions,
                               "series description"))
    if match.calling_ae:
        results.append(_in([facts.calling_ae], [a.upper() for a in match.calling_ae],
                           "calling AE"))
    if match.institution is not None:
        results.append(_search(match.institution, [facts.institution], "institution"))
    if match.age_min is not None or match.age_max is not None:
        results.append(_age(match, facts.age_years))
    if match.time_from is not None and match.time_to is not None:
        results.append(_time(match.time_from, match.time_to, facts.local_minutes()))
    if not results:
        return True, ["no conditions: matches every study"]
    return all(ok for ok, _ in results), [("✓ " if ok else "✗ ") + why for ok, why in results]


def _age(match: Match, age: float | None) -> tuple[bool, str]:
    lo = "" if match.age_min is None else f"{match.age_min:g}"
    hi = "" if match.age_max is None else f"{match.age_max:g}"
    wanted = f"[{lo or '0'}, {hi or '∞'}] years"
    if age is None:
        return False, f"patient age unknown (no PatientAge or birth date), wanted {wanted}"
    ok = (match.age_min is None or age >= match.age_min) and \
         (match.age_max is None or age <= match.age_max)
    return ok, f"patient age {age:.1f} years {'is' if ok else 'is not'} in {wanted}"


def _time(start: int, end: int, now: int) -> tuple[bool, str]:
    ok = start <= now < end if start <= end else (now >= start or now < end)  # wraps midnight
    return ok, (f"received at {_hhmm(now)} {'is' if ok else 'is not'} between "
                f"{_hhmm(start)} and {_hhmm(end)}")


def ordered(workflows: Sequence[Workflow]) -> list[Workflow]:
    return sorted(workflows, key=lambda w: (w.order, w.path))


def decide(workflows: Sequence[Workflow], facts: StudyFacts) -> Decision:
    """Apply the workflows to one study."""
    trace: list[RuleTrace] = []
    applied: list[tuple[Workflow | None, Rule]] = []
    stopped = False
    for wf in ordered(workflows):
        for rule in wf.rules:
            if rule.default:
                continue
            if stopped:
                trace.append(RuleTrace(wf.name, rule.name, rule.line, False, [],
                                       note="not tried: an earlier rule matched"))
                continue
            ok, reasons = check(rule.match, facts)
            trace.append(RuleTrace(wf.name, rule.name, rule.line, ok, reasons, applied=ok))
            if ok:
                applied.append((wf, rule))
                stopped = not rule.cont
    if not stopped:
        # The catch-all belongs to the file tried last (the site's base file, highest order).
        default = next(((wf, wf.default_rule) for wf in reversed(ordered(workflows))
                        if wf.default_rule), (None, FALLBACK_RULE))
        wf, rule = default
        trace.append(RuleTrace(wf.name if wf else "(built in)", rule.name, rule.line, True,
                               ["default rule: no earlier rule stopped the search"],
                               applied=True))
        applied.append(default)
    return _combine(applied, trace)


def _combine(applied: list[tuple[Workflow | None, Rule]], trace: list[RuleTrace]) -> Decision:
    """Later applied rules override the fields they set; actions accumulate.

    A field no applied rule sets comes from the default rule of the first
    applied rule's file, so a rule may set only what differs.
    """
    first_wf = applied[0][0]
    base = first_wf.default_rule if first_wf else None
    priority = base.priority if base else None
    sla = base.sla_minutes if base else None
    pool = base.pool if base else None
    ladder = base.escalation if base else None
    actions: list[dict[str, Any]] = []
    for _wf, rule in applied:
        priority = rule.priority or priority
        sla = rule.sla_minutes or sla
        pool = rule.pool or pool
        ladder = rule.escalation if rule.escalation is not None else ladder
        actions.extend(dict(a) for a in rule.actions)
    return Decision(
        priority=priority or "routine", sla_minutes=sla or 60.0, pool=pool or FALLBACK_POOL,
        escalation=tuple(ladder if ladder is not None else FALLBACK_RULE.escalation or ()),
        actions=actions,
        workflow=(first_wf.name if first_wf else "(built in)"),
        rule=" + ".join(r.name for _, r in applied),
        workflow_sha=(first_wf.sha256 if first_wf else ""), trace=trace,
    )
