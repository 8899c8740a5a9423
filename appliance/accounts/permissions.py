"""Who may open what: role groups, the routes open to anyone, the navigation per role.

A view states its roles itself with ``@auth.require(*roles)``; this module
holds the role groups those calls use and the few endpoints that are public
on purpose. ``tests/test_permissions.py`` walks every rule of the app and
fails for a route that is neither required nor listed here.
"""

from __future__ import annotations

from appliance.accounts.users import ROLES
from appliance.consults.rooms import HOST_ROLES as CONSULT_HOSTS

ALL = ROLES
READERS = ("radiologist", "neurologist")
ADMINS = ("admin",)
OPERATORS = ("admin", "responder")  # provision, configure, watch health
# Turnaround figures name readers but no patient: the people who run the read service see them.
DASHBOARD = ("admin", "responder", "radiologist", "neurologist")

# Endpoints anyone may call without signing in, with the reason. Views of our
# own are marked with @auth.public instead; these belong to Flask or to
# blueprints that monitoring must reach without an account.
PUBLIC_ENDPOINTS: dict[str, str] = {
    "static": "CSS and JS of the login page",
    "health.livez": "process liveness for the supervisor and systemd",
    "health.readyz": "readiness for the supervisor, load balancers and responders",
}

# Navigation links: (href, label, roles that see it). A link is shown only if
# the app has a route for it (areas are optional modules).
NAV: list[tuple[str, str, tuple[str, ...]]] = [
    ("/worklist", "Worklist", READERS),
    ("/critical", "Critical findings", ("site_staff", "responder", "admin")),
    ("/reports", "Reports", ("site_staff",)),
    ("/consults", "Consults", CONSULT_HOSTS),
    ("/dashboard", "Turnaround", DASHBOARD),
    ("/status", "Status", OPERATORS),
    ("/admin/users", "Users", ADMINS),
    ("/admin/audit", "Audit trail", ADMINS),
    ("/admin/break-glass", "Break-glass", ADMINS),
]
