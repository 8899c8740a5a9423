"""Every workflow action key has an executor with an effect a test observes.

A documented action that is parsed, stored and printed but does nothing is the worst
defect (issue 12: ``forward:`` was exactly that).  ``EFFECTS`` maps each key of
``workflows.schema.ACTION_KEYS`` to a check run on a real site: the same routine CT study
is decided once by a rule without the action and once with it, and the check must see a
difference.  Adding an action key without adding its effect here fails the first test.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from forwarding_site import FAR, ingest
from reporting_site import add_users, local_site

from appliance.core import config, db
from appliance.forwarding import outbox as forward_outbox
from appliance.reading import read_queue, worklist
from appliance.sync import bundle as sync_bundle
from appliance.sync import outbox as sync_outbox
from workflows.schema import ACTION_KEYS


def _forward(conn, cfg, study_uid: str) -> object:
    return forward_outbox.study_summary(conn, study_uid).get("SITEPACS", {}).get("waiting", 0)


def _sync(conn, cfg, study_uid: str) -> object:
    return sync_outbox.study_priority(conn, cfg, study_uid, "") == sync_bundle.PRIORITY_STAT


def _hold(conn, cfg, study_uid: str) -> object:
    item = worklist.get_item(conn, conn.execute(
        "SELECT id FROM read_items WHERE study_uid = ?", (study_uid,)).fetchone()[0])
    try:
        worklist.claim(conn, item["id"], "dr.ray", FAR + 1)
    except worklist.Conflict:
        return "refused"
    return "claimed"


# key → (the action as written in YAML, what to observe)
EFFECTS: dict[str, tuple[str, Callable]] = {
    "forward": ("{forward: SITEPACS}", _forward),
    "sync": ("{sync: high}", _sync),
    "hold": ("{hold: true}", _hold),
}


def test_every_action_key_has_an_executor_here() -> None:
    assert set(EFFECTS) == set(ACTION_KEYS), "an action key without an observed effect"


def _decide(tmp_path, action: str):
    """One site, two studies: one matched by a rule without the action, one with it."""
    from forwarding_site import add_destination

    site = local_site(tmp_path)
    add_destination(site, "SITEPACS", 104)
    add_users(site)
    for f in (site.data_dir / "workflows").glob("*.yaml"):
        f.unlink()
    (site.data_dir / "workflows" / "rule.yaml").write_text(
        "workflow: one\npools:\n  r: {role: radiologist}\nrules:\n  - name: acted\n"
        "    match: {study_description: ACTED}\n    priority: routine\n    sla_minutes: 60\n"
        f"    pool: r\n    actions: [{action}]\n  - name: plain\n    default: true\n"
        "    priority: routine\n    sla_minutes: 60\n    pool: r\n")
    cfg = config.load(site.data_dir)
    plain, _ = ingest(site, 2, study_description="CT CHEST")
    acted, _ = ingest(site, 2, study_description="CT CHEST ACTED")
    read_queue.sweep(cfg, now=FAR)
    return db.connect(cfg.db_path), cfg, plain, acted


@pytest.mark.parametrize("key", ACTION_KEYS)
def test_each_action_has_an_observable_effect(tmp_path, key: str) -> None:
    action, observe = EFFECTS[key]
    conn, cfg, plain, acted = _decide(tmp_path, action)
    assert observe(conn, cfg, plain) != observe(conn, cfg, acted), \
        f"{key}: the rule's action changed nothing"
