"""A signed report as documents: a DICOM Basic Text SR, a PDF, a DICOM Encapsulated PDF.

Every document is made from one *signed version* (``report_versions`` row),
never from the editable draft, so what reaches the site is exactly what the
reader signed.  The patient and study identifiers come from the DICOM index
(``studies``), so the SR and PDF file under the right patient and study in
the site PACS; each goes in a new series of the same study.

UIDs are chosen once, when the delivery is queued, and passed in here, so a
retried C-STORE sends the same SOP Instance UID and the PACS keeps one copy.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fpdf import FPDF
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    BasicTextSRStorage,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
)

from appliance.reports import model as reports

MANUFACTURER = "Field teleradiology appliance"
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


@dataclass
class SignedReport:
    """What a document needs: the signed version, its report, the study row, the site."""

    version: dict[str, Any]  # report_versions row
    report: dict[str, Any]  # reports row
    study: dict[str, Any]  # studies row (patient and study attributes)
    site_name: str
    series_uid: str
    sop_uid: str
    predecessor: tuple[str, str, str] | None = None  # (series, sop class, sop) of the original SR
    evidence: list[tuple[str, str, str]] | None = None  # (series, sop class, sop) read
    templates: dict[str, reports.Template] | None = None  # the site's, for field labels

    @property
    def signed_at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.version["signed_at"]).astimezone()

    @property
    def title(self) -> str:
        kind = "Addendum" if self.report["kind"] == "addendum" else "Report"
        return f"{kind}: {self.study.get('study_description') or 'imaging study'}"[:64]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _patient_and_study(ds: Dataset, doc: SignedReport) -> None:
    s = doc.study
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: names and text need not be ASCII
    ds.PatientName = s.get("patient_name", "")
    ds.PatientID = s.get("patient_id", "")
    if s.get("issuer_of_patient_id"):
        ds.IssuerOfPatientID = s["issuer_of_patient_id"]
    ds.PatientBirthDate = s.get("patient_birth_date", "")
    ds.PatientSex = s.get("patient_sex", "")
    ds.StudyInstanceUID = doc.report["study_uid"]
    ds.StudyDate = s.get("study_date", "")
    ds.StudyTime = s.get("study_time", "")
    ds.AccessionNumber = s.get("accession_number", "")
    ds.StudyID = s.get("study_id", "")
    ds.ReferringPhysicianName = s.get("referring_physician", "")
    ds.StudyDescription = s.get("study_description", "")
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = s.get("institution_name", "") or doc.site_name


def _meta(ds: Dataset, sop_class: str, sop_uid: str) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid


def _text_item(concept: Dataset, text: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = Sequence([concept])
    item.TextValue = text
    return item


def _container(concept: Dataset, children: list[Dataset], relationship: str = "") -> Dataset:
    c = Dataset()
    if relationship:
        c.RelationshipType = relationship
    c.ValueType = "CONTAINER"
    c.ConceptNameCodeSequence = Sequence([concept])
    c.ContinuityOfContent = "SEPARATE"
    c.ContentSequence = Sequence(children)
    return c


def _sr_content(doc: SignedReport) -> list[Dataset]:
    """Findings and impression sections (TID 2000 shape) from the signed text."""
    v = doc.version
    templates = doc.templates or reports.load_templates()
    template = templates.get(v["template_id"]) or templates["generic"]
    fields = v["fields"] if isinstance(v["fields"], dict) else {}
    finding = _code("121071", "DCM", "Finding")
    items = [_text_item(finding, f"{label}: {value}")
             for label, value in reports.field_lines(template, fields)]
    if v["findings"].strip():
        items.append(_text_item(finding, v["findings"].strip()))
    sections = []
    if items:
        sections.append(_container(_code("121070", "DCM", "Findings"), items, "CONTAINS"))
    if v["impression"].strip():
        sections.append(_container(_code("121072", "DCM", "Impressions"), [
            _text_item(_code("121073", "DCM", "Impression"), v["impression"].strip())],
            "CONTAINS"))
    return sections


def _references(study_uid: str, refs: list[tuple[str, str, str]]) -> Dataset:
    by_series: dict[str, list[Dataset]] = {}
    for series_uid, sop_class, sop_uid in refs:
        r = Dataset()
        r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = sop_class, sop_uid
        by_series.setdefault(series_uid, []).append(r)
    item = Dataset()
    item.StudyInstanceUID = study_uid
    series = []
    for series_uid, sops in by_series.items():
        s = Dataset()
        s.SeriesInstanceUID = series_uid
        s.ReferencedSOPSequence = Sequence(sops)
        series.append(s)
    item.ReferencedSeriesSequence = Sequence(series)
    return item


def build_sr(doc: SignedReport) -> Dataset:
    """A Basic Text SR of the signed version: VERIFIED with its verifying observer."""
    ds = Dataset()
    _meta(ds, BasicTextSRStorage, doc.sop_uid)
    _patient_and_study(ds, doc)
    when = doc.signed_at
    ds.InstanceCreationDate, ds.InstanceCreationTime = when.strftime("%Y%m%d"), when.strftime(
        "%H%M%S")
    ds.Modality = "SR"
    ds.SeriesInstanceUID = doc.series_uid
    ds.SeriesNumber = 9000 + (1 if doc.report["kind"] == "addendum" else 0)
    ds.SeriesDescription = "Addendum" if doc.report["kind"] == "addendum" else "Report"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = doc.version["signer_name"]
    observer.VerifyingObserverIdentificationCodeSequence = Sequence()
    observer.VerifyingOrganization = doc.site_name
    observer.VerificationDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.VerifyingObserverSequence = Sequence([observer])
    ds.PreliminaryFlag = "FINAL"
    ds.PerformedProcedureCodeSequence = Sequence()
    if doc.evidence:
        ds.CurrentRequestedProcedureEvidenceSequence = Sequence(
            [_references(doc.report["study_uid"], doc.evidence)])
    if doc.predecessor:
        ds.PredecessorDocumentsSequence = Sequence(
            [_references(doc.report["study_uid"], [doc.predecessor])])
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource, template.TemplateIdentifier = "DCMR", "2000"
    ds.ContentTemplateSequence = Sequence([template])
    ds.ContentSequence = Sequence(_sr_content(doc))
    return ds


# -- PDF ------------------------------------------------------------------------------------
def _pdf_font(pdf: FPDF, texts: list[str]) -> str:
    """The core font when every text is Latin-1 (nothing to embed: 3x faster), else DejaVu.

    DejaVu covers other scripts (names in Arabic, Cyrillic …); without it on
    the system, characters outside Latin-1 print as '?'.
    """
    try:
        "".join(texts).encode("latin-1")
        return "Helvetica"
    except UnicodeEncodeError:
        pass
    regular, bold = FONT_DIR / "DejaVuSans.ttf", FONT_DIR / "DejaVuSans-Bold.ttf"
    if regular.exists() and bold.exists():
        pdf.add_font("DejaVu", "", str(regular))
        pdf.add_font("DejaVu", "B", str(bold))
        return "DejaVu"
    return "Helvetica"


def _pdf_lines(doc: SignedReport) -> list[tuple[str, int, str, float, float]]:
    """(text, size, style, line height, space before) of the printable report, in order."""
    s = doc.study
    lines = [
        (doc.site_name, 9, "", 5.5, 0),
        (doc.title, 15, "B", 8, 0),
        (f"Patient: {str(s.get('patient_name', '')).replace('^', ' ')}   "
         f"ID: {s.get('patient_id', '')}   Born: {_date(s.get('patient_birth_date', ''))}   "
         f"Sex: {s.get('patient_sex', '')}", 10, "", 5.5, 0),
        (f"Study: {_date(s.get('study_date', ''))}   Accession: {s.get('accession_number', '')}"
         f"   Modality: {s.get('modalities', '')}", 10, "", 5.5, 0),
    ]
    for i, paragraph in enumerate(doc.version["text"].split("\n")):
        is_heading = paragraph.isupper() and 0 < len(paragraph) < 60
        lines.append((paragraph or " ", 11, "B" if is_heading else "", 5.5, 3 if i == 0 else 0))
    lines.append((f"Signed {doc.version['level']} by {doc.version['signer_name']} on "
                  f"{doc.signed_at.strftime('%Y-%m-%d %H:%M %Z')}", 10, "B", 5.5, 4))
    lines.append((f"Text SHA-256 {doc.version['sha256']}", 7, "", 5.5, 0))
    return lines


def render_pdf(doc: SignedReport) -> bytes:
    """A printable A4 PDF of the signed version (pure Python, fpdf2)."""
    pdf = FPDF(format="A4")
    pdf.set_creation_date(doc.signed_at)
    pdf.set_title(doc.title)
    pdf.set_author(doc.version["signer_name"])
    lines = _pdf_lines(doc)
    font = _pdf_font(pdf, [text for text, *_ in lines])
    pdf.set_auto_page_break(True, margin=18)
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin
    for text, size, style, height, space in lines:
        if space:
            pdf.ln(space)
        pdf.set_font(font, style, size)
        if font != "DejaVu":
            text = text.encode("latin-1", "replace").decode("latin-1")
        pdf.multi_cell(width, height, text, new_x="LMARGIN", new_y="NEXT")
    out = io.BytesIO()
    pdf.output(out)
    return out.getvalue()


def _date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 and value.isdigit() else value


def build_encapsulated_pdf(doc: SignedReport, pdf_bytes: bytes) -> Dataset:
    """A DICOM Encapsulated PDF of the printable report, in its own series of the study."""
    ds = Dataset()
    _meta(ds, EncapsulatedPDFStorage, doc.sop_uid)
    _patient_and_study(ds, doc)
    when = doc.signed_at
    ds.InstanceCreationDate, ds.InstanceCreationTime = when.strftime("%Y%m%d"), when.strftime(
        "%H%M%S")
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = doc.series_uid
    ds.SeriesNumber = 9100 + (1 if doc.report["kind"] == "addendum" else 0)
    ds.SeriesDescription = "Report (PDF)"
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = doc.title
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    data = pdf_bytes + (b"\x00" if len(pdf_bytes) % 2 else b"")
    ds.EncapsulatedDocument = data
    ds.EncapsulatedDocumentLength = len(pdf_bytes)
    return ds
