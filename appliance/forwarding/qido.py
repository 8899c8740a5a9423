"""What a PACS holds, asked by QIDO-RS (PS3.18 §10.6) when its known AE has a ``dicomweb_url``.

One search per study, ``GET {url}/instances?StudyInstanceUID=…`` (a search, so a study the
PACS lacks is an empty answer, not a 404), paged with ``limit``/``offset``.  Every failure
(HTTP error, unreachable, not JSON, a server that ignores ``offset``) raises
:class:`QidoError`: an unanswered question must never read as "the PACS holds nothing" (that
would resend everything) and still less as "holds everything" (that would lose a study).
Errors name the base URL and the HTTP status only, never a UID: they reach the status page.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

PAGE = 1000  # instances per request
MAX_PAGES = 500  # 500,000 instances in one study is beyond any hand-back
SOP_INSTANCE_UID, SERIES_UID, STUDY_UID = "00080018", "0020000E", "0020000D"

Key = tuple[str, str]  # (study, series)


class QidoError(Exception):
    """The PACS did not answer the QIDO-RS search usably."""


def held(base_url: str, expected: dict[Key, set[str]],
         timeout: float) -> dict[Key, set[str]]:
    """(study, series) → SOP Instance UIDs the PACS holds, for the studies of ``expected``.

    An answer without a Series Instance UID is placed by its SOP Instance UID (globally
    unique) in the series that expected it."""
    out: dict[Key, set[str]] = {k: set() for k in expected}
    where: dict[str, dict[str, Key]] = {}
    for key, uids in expected.items():
        where.setdefault(key[0], {}).update({u: key for u in uids})
    for study, places in where.items():
        for item in study_instances(base_url, study, timeout):
            sop, series, st = (_value(item, t) for t in (SOP_INSTANCE_UID, SERIES_UID, STUDY_UID))
            if not sop or (st and st != study):
                continue  # not an instance of this study (a server that ignored the match)
            key = (study, series) if series else places.get(sop)
            if key in out:
                out[key].add(sop)
    return out


def study_instances(base_url: str, study_uid: str, timeout: float) -> Iterator[dict[str, Any]]:
    """Every instance of a study the PACS answers for, page by page."""
    offset, seen = 0, set()
    for _ in range(MAX_PAGES):
        query = urlencode({"StudyInstanceUID": study_uid, "includefield": SERIES_UID,
                           "limit": PAGE, "offset": offset})
        page, more = _search(f"{base_url.rstrip('/')}/instances?{query}", base_url, timeout)
        fresh = {_value(i, SOP_INSTANCE_UID) for i in page} - seen
        if page and not fresh:
            raise QidoError(f"{base_url} answered the same page for offset {offset}: it does"
                            " not page with limit/offset")
        seen |= fresh
        yield from page
        if not page or (len(page) < PAGE and not more):
            return
        offset += len(page)
    raise QidoError(f"{base_url}: more than {PAGE * MAX_PAGES} instances in one study")


def _search(url: str, base_url: str, timeout: float) -> tuple[list[dict[str, Any]], bool]:
    """One QIDO request: its JSON array, and whether the server said more results exist (a
    ``Warning`` header, PS3.18 §8.3.4.4, when it cut the page shorter than ``limit``)."""
    req = urllib.request.Request(url, headers={"Accept": "application/dicom+json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body = resp.status, resp.read()
            more = "additional results" in (resp.headers.get("Warning") or "").lower()
    except urllib.error.HTTPError as e:
        raise QidoError(f"{base_url} answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise QidoError(f"cannot reach {base_url}: {reason}") from None
    if status == 204 or not body.strip():
        return [], False
    try:
        page = json.loads(body)
    except ValueError:
        raise QidoError(f"{base_url} answered HTTP {status} with something other than"
                        " DICOM JSON") from None
    if not isinstance(page, list) or not all(isinstance(i, dict) for i in page):
        raise QidoError(f"{base_url} answered a search with JSON that is not a list of"
                        " datasets")
    return page, more


def _value(item: dict[str, Any], tag: str) -> str:
    """The first value of a UI attribute in a DICOM JSON dataset, or ''."""
    attr = item.get(tag)
    values = attr.get("Value") if isinstance(attr, dict) else None
    return str(values[0]) if isinstance(values, list) and values else ""
