"""The role groups: which roles read, run the box, host consults, see turnaround.

Defined once here (the only place a list of roles is written) and imported by
every capability that checks a role, so a new reading role is added in one
line. This module imports nothing of the appliance but the role names, so
sessions, consults and reports can all import it without a cycle.
"""

from __future__ import annotations

from appliance.accounts.users import ROLES

ALL = ROLES
READERS = ("radiologist", "neurologist")
ADMINS = ("admin",)
OPERATORS = ("admin", "responder")  # provision, configure, watch health, triage the worklist
SITE_STAFF = ("site_staff",)
# Images (DICOMweb, the viewer): the readers, and admins who check a study came in whole.
IMAGE_VIEWERS = ("admin", *READERS)
# A signed report: the readers, and the site staff it is written for.
REPORT_VIEWERS = (*READERS, *SITE_STAFF)
# Who may start, host and end a consult (guests come by invite link instead).
CONSULT_HOSTS = ("site_staff", "neurologist", "radiologist", "admin", "responder")
# Turnaround figures name readers but no patient: the people who run the read service see them.
DASHBOARD = ("admin", "responder", "radiologist", "neurologist")
# Who may ask for a break-glass grant (a typed reason opens one study outside pool or site).
BREAK_GLASS = (*READERS, *SITE_STAFF)
