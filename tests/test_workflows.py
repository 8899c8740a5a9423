"""Workflow files: the schema (valid files, a table of invalid ones with the exact line), matching."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from workflows import engine, facts
from workflows.schema import WorkflowError, load, parse

LIBRARY = sorted((ROOT / "workflows" / "library").glob("*.yaml"))
ROLES = ("admin", "responder", "site_staff", "radiologist", "neurologist")

BASE = """\
workflow: test
pools:
  rads: {role: radiologist}
  neuro: {role: neurologist, tags: [neuro]}
on_call:
  duty: [dr.a]
rules:
"""
DEFAULT_RULE = """\
  - name: fallback
    default: true
    priority: routine
    sla_minutes: 60
    pool: rads
"""


def doc(rules: str, base: str = BASE) -> str:
    return base + textwrap.indent(textwrap.dedent(rules), "  ") + DEFAULT_RULE


def test_library_files_are_valid_and_commented():
    assert {p.name for p in LIBRARY} >= {"disaster-default.yaml", "teleneurology-stroke.yaml",
                                         "teleradiology-general.yaml"}
    for path in LIBRARY:
        wf = load(path, ROLES)
        assert wf.default_rule is not None, path
        comments = [line for line in path.read_text().splitlines() if line.strip().startswith("#")]
        assert len(comments) >= 5, f"{path.name} should explain itself to a responder"


def test_validate_cli_accepts_the_library():
    result = run_cli("workflow", "validate", *map(str, LIBRARY))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok") == len(LIBRARY)


# (name, rules text appended to BASE, expected "line:column: message fragment")
INVALID = [
    ("unknown key", """\
      - name: a
        match: {modality: CT}
        prority: stat
     """, "10:5: unknown key 'prority' in rule 'a'"),
    ("wrong type", """\
      - name: a
        sla_minutes: soon
     """, "9:18: rule 'a' sla_minutes: expected a number, got the text 'soon'"),
    ("bad regex", """\
      - name: a
        match:
          study_description: "head(ct"
     """, "10:26: rule 'a' match study_description: bad regular expression"),
    ("unknown pool", """\
      - name: a
        pool: neurologists
     """, "9:11: rule 'a': unknown pool 'neurologists' (pools: rads, neuro)"),
    ("ladder out of order", """\
      - name: a
        sla_minutes: 30
        escalation:
          - {at: 0.75, action: notify_pool}
          - {at: 0.5, action: notify_pool}
     """, "12:14: rule 'a' escalation step 2: fires at 0.5 of the SLA, not after step 1"),
    ("ladder before due beyond the SLA", """\
      - name: a
        sla_minutes: 30
        escalation:
          - {before_due_min: 45, action: notify_pool}
     """, "11:26: rule 'a' escalation step 1: fires at or before the first image"),
    ("breach not at the due time", """\
      - name: a
        escalation:
          - {at: 0.9, action: mark_breached}
     """, "10:14: rule 'a' escalation step 1: mark_breached must be at 1.0"),
    ("unknown on-call", """\
      - name: a
        escalation:
          - {at: 0.5, action: notify_on_call, on_call: nobody}
     """, "10:52: rule 'a' escalation step 1: unknown on_call 'nobody'"),
    ("unknown escalation action", """\
      - name: a
        escalation:
          - {at: 0.5, action: page_everyone}
     """, "10:27: rule 'a' escalation step 1: unknown action 'page_everyone'"),
    ("bad priority", """\
      - name: a
        priority: asap
     """, "9:15: rule 'a': priority must be one of stat, urgent, routine"),
    ("bad time of day", """\
      - name: a
        match:
          time_of_day: {from: "25:00", to: "07:00"}
     """, "10:27: rule 'a' match time_of_day: 'from' must be a time like"),
    ("age range upside down", """\
      - name: a
        match:
          patient_age: {min: 65, max: 18}
     """, "10:35: rule 'a' match patient_age: max 18 is below min 65"),
    ("bad action", """\
      - name: a
        actions:
          - sync: urgent
     """, "10:15: rule 'a' actions: sync priority must be one of high, normal, low"),
]


@pytest.mark.parametrize("rules,expected", [(r, e) for _, r, e in INVALID],
                         ids=[n for n, _, _ in INVALID])
def test_invalid_file_names_line_and_problem(tmp_path: Path, rules: str, expected: str):
    path = tmp_path / "wf.yaml"
    path.write_text(doc(rules))
    with pytest.raises(WorkflowError) as err:
        load(path, ROLES)
    assert f"{path}:{expected}" in str(err.value), str(err.value)


def test_pool_naming_an_unknown_role(tmp_path: Path):
    text = BASE.replace("rads: {role: radiologist}", "rads: {role: radiographer}") + DEFAULT_RULE
    with pytest.raises(WorkflowError) as err:
        parse(text, "wf.yaml", ROLES)
    assert "wf.yaml:3:16: pool 'rads': unknown role 'radiographer'" in str(err.value)


def test_not_yaml_and_missing_rules():
    with pytest.raises(WorkflowError) as err:
        parse("workflow: x\nrules: [\n  - a: b\n", "w.yaml", ROLES)
    assert str(err.value).startswith("w.yaml:") and "not valid YAML" in str(err.value)
    with pytest.raises(WorkflowError) as err:
        parse("workflow: x\n", "w.yaml", ROLES)
    assert "'rules' is required" in str(err.value)


def test_every_problem_reported_in_file_order(tmp_path: Path):
    path = tmp_path / "many.yaml"
    path.write_text(doc("""\
      - name: a
        pool: nope
        priority: asap
     """))
    result = run_cli("workflow", "validate", str(path))
    assert result.returncode == 1
    lines = [x for x in result.stderr.splitlines() if x.startswith(str(path))]
    assert [x.split(":")[1] for x in lines] == ["9", "10"]


# -- matching ------------------------------------------------------------------------------
def study(**kw) -> engine.StudyFacts:
    base = dict(study_uid="1.2.3", modalities=("CT",), body_parts=("HEAD",),
                study_description="CT HEAD W/O", series_descriptions=("AXIAL 5MM",),
                calling_ae="CT_ROOM2", institution="Field Hospital North", age_years=54.0,
                received_at=dt.datetime(2026, 3, 1, 10, 30).timestamp())
    base.update(kw)
    return engine.StudyFacts(**base)


def library() -> list:
    return [load(p, ROLES) for p in LIBRARY]


def test_disaster_default_ct_head_stat_and_routine():
    wf = load(ROOT / "workflows/library/disaster-default.yaml", ROLES)
    d = engine.decide([wf], study())
    assert (d.priority, d.sla_minutes, d.rule, d.pool.name) == ("stat", 30, "ct-head-stat",
                                                                "radiologists")
    assert d.due_at(1000.0) == 1000.0 + 30 * 60
    d = engine.decide([wf], study(modalities=("CR",), body_parts=("CHEST",)))
    assert (d.priority, d.sla_minutes, d.rule) == ("routine", 60, "routine")
    # every ladder ends in a breach at the due time, whether written or not
    times = d.step_times(0.0)
    assert times[-1][2].action == "mark_breached" and times[-1][1] == 3600.0
    assert [round(t) for _, t, _ in times] == [1800, 3000, 3600]


def test_stroke_file_is_tried_first_and_explains_why():
    d = engine.decide(library(), study(study_description="CODE STROKE CTA HEAD"))
    assert d.rule == "stroke-protocol" and d.pool.name == "stroke-neuro"
    assert d.pool.tags == ("neuro",) and d.pool.roles == ("neurologist",)
    first = d.trace[0]
    assert first.matched and any("matches" in r for r in first.reasons)
    assert all(t.note for t in d.trace[1:] if not t.matched), "later rules are not tried"


def test_why_not_names_each_failed_condition():
    d = engine.decide(library(), study(study_description="CT CHEST", body_parts=("CHEST",),
                                       age_years=9.0))
    stroke = next(t for t in d.trace if t.rule == "stroke-protocol")
    assert not stroke.matched
    assert any(r.startswith("✗ study description 'CT CHEST' does not match") for r in
               stroke.reasons)
    assert any(r.startswith("✗ patient age 9.0 years is not in [16, ∞]") for r in stroke.reasons)
    assert d.rule.startswith("paediatric")


def test_continue_lets_a_later_rule_override_the_pool():
    night = study(modalities=("CR",), body_parts=("CHEST",), age_years=6.0,
                  study_description="CHEST PA",
                  received_at=dt.datetime(2026, 3, 1, 23, 15).timestamp())
    general = [load(ROOT / "workflows/library/teleradiology-general.yaml", ROLES)]
    d = engine.decide(general, night)
    assert d.rule == "paediatric + night-reads"
    assert (d.priority, d.sla_minutes, d.pool.name) == ("urgent", 45, "north-region")
    day = engine.decide(general, study(modalities=("CR",), body_parts=("CHEST",), age_years=6.0,
                                       study_description="CHEST PA"))
    assert day.rule == "paediatric + chest-xray" and day.pool.name == "general"


def test_calling_ae_institution_and_series_description(tmp_path: Path):
    text = doc("""\
      - name: mobile
        match:
          calling_ae: [MOBILE_CT]
          institution: "north"
          series_description: "^perf"
        priority: urgent
        sla_minutes: 45
        pool: neuro
        actions:
          - forward: PACS1
          - hold: true
     """)
    wf = parse(text, "t.yaml", ROLES)
    hit = study(calling_ae="MOBILE_CT", series_descriptions=("AXIAL", "Perfusion 4D"))
    d = engine.decide([wf], hit)
    assert d.rule == "mobile" and d.hold and {"forward": "PACS1"} in d.actions
    miss = engine.decide([wf], study(calling_ae="CT_ROOM2"))
    assert miss.rule == "fallback" and not miss.hold
    assert "✗ calling AE CT_ROOM2 is not one of MOBILE_CT" in miss.trace[0].reasons


def test_no_workflow_loaded_falls_back_and_routes():
    d = engine.decide([], study())
    assert d.rule == "built-in-fallback" and d.sla_minutes == 60 and d.priority == "routine"


def test_patient_age_from_age_string_or_birth_date():
    assert facts.age_years("045Y", "", None) == 45
    assert facts.age_years("006M", "", None) == 0.5
    assert round(facts.age_years("", "19700101", "20200101"), 1) == 50.0
    assert facts.age_years("", "", "20200101") is None
    assert facts.age_years("", "20300101", "20200101") is None


def test_time_of_day_wraps_midnight():
    m = engine.Match(time_from=20 * 60, time_to=7 * 60)
    at = lambda h, mi: study(received_at=dt.datetime(2026, 3, 1, h, mi).timestamp())  # noqa: E731
    assert engine.check(m, at(23, 0))[0] and engine.check(m, at(6, 59))[0]
    assert not engine.check(m, at(7, 0))[0] and not engine.check(m, at(12, 0))[0]
