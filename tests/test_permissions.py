"""The permission table: every rule of the app × every role → allowed or denied, by real requests.

A route that is neither wrapped in ``auth.require`` nor public on purpose
(``@auth.public`` or ``permissions.PUBLIC_ENDPOINTS``) fails this test, so a
route added without a permission cannot slip in. The measured table is saved
as a test artifact (``permissions.md``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flask import url_for
from test_auth import AuthApp, make_auth_app

from appliance.accounts import permissions
from appliance.accounts import sessions as auth
from appliance.accounts import users as accounts

DENIED_PREFIX = "forbidden: this needs the role"
SAFE_METHODS = {"GET"}

# The areas of this brief, stated independently of the decorators.
EXPECTED = {
    "ui.worklist_page": permissions.READERS,
    "ui.worklist_items": permissions.READERS,
    "ui.claim": permissions.READERS,
    "ui.release": permissions.READERS,
    "ui.dashboard": ("admin", "responder", "radiologist", "neurologist"),
    "admin.users": ("admin",),
    "admin.set_disabled": ("admin",),
    "admin.audit_trail": ("admin",),
    "admin.break_glass_list": ("admin",),
    "auth_views.break_glass": ("radiologist", "neurologist", "site_staff"),
    "auth_views.change_password": accounts.ROLES,
}


@pytest.fixture(scope="module")
def perm_app(tmp_path_factory) -> tuple[AuthApp, dict[str, str]]:
    a = make_auth_app(tmp_path_factory.mktemp("perm"))
    bearer = {}
    for role in accounts.ROLES:
        a.add_user(f"u-{role.replace('_', '-')}", role)
        bearer[role] = a.token(f"u-{role.replace('_', '-')}")
    return a, bearer


def _is_public(app, endpoint: str) -> bool:
    view = app.view_functions[endpoint]
    return getattr(view, "auth_public", False) or endpoint in permissions.PUBLIC_ENDPOINTS


CANDIDATES = ("1.2.3", 1, 1.0, "00000000-0000-0000-0000-000000000000", "a")


def _url(app, rule) -> str:
    """A URL this very rule matches, with dummy values its converters accept."""
    args = {}
    for name, conv in rule._converters.items():
        args[name] = next(v for v in CANDIDATES if _accepts(conv, v))
    with app.test_request_context():
        return url_for(rule.endpoint, **args)


def _accepts(conv, value) -> bool:
    try:
        return re.fullmatch(conv.regex, str(conv.to_url(value))) is not None
    except Exception:
        return False


def _routes(app):
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield rule, method


def test_every_route_declares_who_may_use_it(perm_app):
    app = perm_app[0].app
    missing = [f"{m} {r.rule} ({r.endpoint})" for r, m in _routes(app)
               if not _is_public(app, r.endpoint)
               and not hasattr(app.view_functions[r.endpoint], "auth_roles")]
    assert not missing, "routes without @auth.require or @auth.public:\n" + "\n".join(missing)


def test_no_credentials_is_401_everywhere_but_public_routes(perm_app):
    a, _ = perm_app
    c = a.client()
    wrong = []
    for rule, method in _routes(a.app):
        if _is_public(a.app, rule.endpoint):
            continue
        try:
            r = c.open(_url(a.app, rule), method=method, headers={"Accept": "application/json"})
            status = r.status_code
        except Exception as e:  # the view ran: that is a hole
            status = f"view ran ({type(e).__name__})"
        if status != 401:
            wrong.append(f"{method} {rule.rule}: {status}")
    assert not wrong, "answered without credentials:\n" + "\n".join(wrong)


def _outcome(c, url: str, method: str, token: str) -> str:
    try:
        r = c.open(url, method=method, headers={"Authorization": f"Bearer {token}",
                                               "Accept": "application/json"})
    except Exception:
        return "allowed"  # the view itself ran (and failed on dummy arguments)
    if r.status_code == 401:
        return "unauthenticated"
    if r.status_code == 403 and DENIED_PREFIX in r.get_data(as_text=True):
        return "denied"
    return "allowed"


def test_role_by_route_table(perm_app, artifacts: Path):
    a, bearer = perm_app
    c = a.client()
    table, mismatches = [], []
    for rule, method in _routes(a.app):
        if _is_public(a.app, rule.endpoint):
            table.append((method, rule.rule, {role: "public" for role in accounts.ROLES}))
            continue
        declared = a.app.view_functions[rule.endpoint].auth_roles
        expected_roles = EXPECTED.get(rule.endpoint, None if declared == auth.ANY_ROLE
                                      else declared) or accounts.ROLES
        row = {}
        for role in accounts.ROLES:
            should = role in expected_roles
            if not should or method in SAFE_METHODS:
                got = _outcome(c, _url(a.app, rule), method, bearer[role])
            else:
                got = "allowed (declared)"  # not run: a POST with dummy data could change state
            row[role] = got
            if got.startswith("allowed") != should:
                mismatches.append(f"{method} {rule.rule} as {role}: {got}, expected "
                                  f"{'allowed' if should else 'denied'}")
        table.append((method, rule.rule, row))
    lines = ["| method | route | " + " | ".join(accounts.ROLES) + " |",
             "|---|---|" + "---|" * len(accounts.ROLES)]
    for method, route, row in table:
        lines.append(f"| {method} | `{route}` | " + " | ".join(row[r] for r in accounts.ROLES)
                     + " |")
    (artifacts / "permissions.md").write_text("\n".join(lines) + "\n")
    assert not mismatches, "\n".join(mismatches)
    assert len(table) >= len(EXPECTED)


def test_expected_areas_exist(perm_app):
    """The table above checks these endpoints; a rename must update it, not skip it."""
    endpoints = {r.endpoint for r in perm_app[0].app.url_map.iter_rules()}
    assert set(EXPECTED) <= endpoints
