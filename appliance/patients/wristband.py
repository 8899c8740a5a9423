"""The printable wristband of a registered patient: the ID as text and as a QR code.

A casualty's band is what every later step scans or reads aloud, so it carries the
Patient ID twice (large text and a QR code that any phone or scanner decodes), the
name, sex and age or age band, and nothing else.  One A4-free strip (25 × 250 mm),
as wristband printers take.
"""

from __future__ import annotations

import io
from typing import Any

import segno
from fpdf import FPDF

WIDTH_MM, HEIGHT_MM = 250, 25


def pdf(patient: dict[str, Any], site_name: str) -> bytes:
    """The wristband PDF for one patient record (as :func:`registry.get` returns it)."""
    doc = FPDF(orientation="L", unit="mm", format=(HEIGHT_MM, WIDTH_MM))
    doc.set_auto_page_break(False)
    doc.set_margins(3, 2, 3)
    doc.set_title(f"Wristband {patient['patient_id']}")
    doc.add_page()
    qr = io.BytesIO()
    segno.make_qr(patient["patient_id"], error="m").save(qr, kind="png", scale=8, border=4)
    qr.seek(0)
    doc.image(qr, x=2, y=1.5, w=22, h=22)
    doc.set_xy(27, 3)
    doc.set_font("Helvetica", "B", 20)
    doc.cell(0, 9, _latin(patient["patient_id"]))
    doc.set_xy(27, 12.5)
    doc.set_font("Helvetica", "", 11)
    doc.cell(0, 5, _latin(f"{patient['name'].replace('^', ' ')}   {_sex_age(patient)}"))
    doc.set_xy(27, 18)
    doc.set_font("Helvetica", "", 7)
    doc.cell(0, 4, _latin(f"{site_name}{'  TEMPORARY IDENTITY' if patient['temporary'] else ''}"))
    return bytes(doc.output())


def _sex_age(patient: dict[str, Any]) -> str:
    parts = [f"sex {patient['sex'] or '?'}"]
    if patient["birth_date"]:
        b = patient["birth_date"]
        parts.append(f"born {b[:4]}-{b[4:6]}-{b[6:]}")
    elif patient["age_band"]:
        parts.append(f"age band {patient['age_band']} (est.)")
    elif patient["age"]:
        parts.append(f"age {int(patient['age'][:3])} (est.)")
    return ", ".join(parts)


def _latin(text: str) -> str:
    """The core PDF fonts are Latin-1: anything else prints as '?' rather than failing."""
    return text.encode("latin-1", "replace").decode("latin-1")
