"""What the viewer page fetches ahead of OHIF: real index and metadata cache, no browser.

The Chromium test (test_viewer_e2e.py) checks the same choices against what
OHIF really requests; these pin the rules: which series a CT head hangs, which
slice OHIF shows first, and that other studies get OHIF's default.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from dicom_data import make_instance
from pydicom.uid import generate_uid

from appliance.core import db
from appliance.dicomweb import metadata as dicomweb_metadata
from appliance.dicomweb import viewer_preload as vp
from dicom_node.study_store import StudyStore


class Site:
    def __init__(self, root: Path):
        self.db_path = root / "appliance.db"
        db.open_db(self.db_path).close()
        self.store = StudyStore(root / "studies", self.db_path, connect=db.connect)
        self.conn = db.connect(self.db_path)
        self.root = root

    def series(self, study: str, n: int, number: int, shuffle: bool = True,
               **kw) -> list[pydicom.Dataset]:
        """``n`` slices 0.5 mm apart along z, stored in a shuffled order."""
        uid, out = generate_uid(), []
        extra = {k: kw.pop(k) for k in ("image_type", "orientation", "thickness") if k in kw}
        for i in range(n):
            ds = make_instance(study, uid, i, rows=16, cols=16, **kw)
            ds.SeriesNumber = number
            if "image_type" in extra:
                ds.ImageType = extra["image_type"]
            if "orientation" in extra:
                ds.ImageOrientationPatient = extra["orientation"]
            if "thickness" in extra:
                ds.SliceThickness = extra["thickness"]
            out.append(ds)
        for ds in random.Random(n).sample(out, n) if shuffle else out:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            assert self.store.store(buf.getvalue(), calling_ae="TEST").success
        return out

    def first(self, study: str, sweep: bool = True) -> list[str]:
        """The preload list, after the worker's metadata sweep (or before it has run)."""
        cfg = SimpleNamespace(db_path=self.db_path, studies_dir=self.root / "studies")
        while sweep and dicomweb_metadata.sweep(cfg):
            pass
        return vp.first_requests(self.conn, study)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def _frame(urls: list[str]) -> str:
    frames = [u for u in urls if "/frames/" in u]
    assert len(frames) == 1
    return frames[0].split("/instances/")[1].split("/")[0]


def test_ct_head_preloads_searches_metadata_and_the_middle_of_the_axial_stack(site: Site):
    study, pid = generate_uid(), "PID 7/ü"
    scout = site.series(study, 2, 1, series_description="SCOUT", patient_id=pid,
                        image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    bone = site.series(study, 40, 3, series_description="AXIAL BONE", thickness=0.5,
                       patient_id=pid)
    axial = site.series(study, 33, 2, series_description="AXIAL 0.5MM", thickness=0.5,
                        body_part="HEAD", patient_id=pid)
    sagittal = site.series(study, 60, 4, series_description="SAG", patient_id=pid,
                           orientation=[0.0, 1.0, 0.0, 0.0, 0.0, -1.0])
    urls = site.first(study)
    assert urls[0] == vp.STUDY_SEARCH.format(study=study)
    assert urls[1] == vp.SERIES_SEARCH.format(study=study)
    # dicomweb-client's encodeURIComponent of the PatientID
    assert urls[2].startswith("/dicom-web/studies?00100020=PID%207%2F%C3%BC&limit=101")
    series_order = [u.split("/series/")[1].split("/")[0] for u in urls if u.endswith("/metadata")]
    assert series_order == [s[0].SeriesInstanceUID for s in (scout, axial, bone, sagittal)]
    # 33 slices: OHIF's middle of the viewport is index 16, counted from the top slice.
    by_z = sorted(axial, key=lambda ds: ds.ImagePositionPatient[2], reverse=True)
    assert _frame(urls) == by_z[16].SOPInstanceUID
    assert f"/series/{axial[0].SeriesInstanceUID}/" in [u for u in urls if "/frames/" in u][0]


def test_even_stack_middle_and_a_chest_ct_gets_the_top_slice_of_its_first_series(site: Site):
    head = generate_uid()
    axial = site.series(head, 300 // 10, 1, study_description="CT STROKE PROTOCOL",
                        body_part="")
    by_z = sorted(axial, key=lambda ds: ds.ImagePositionPatient[2], reverse=True)
    assert _frame(site.first(head)) == by_z[15].SOPInstanceUID  # 30: last 29, middle 15

    chest = generate_uid()
    site.series(chest, 12, 2, study_description="CT CHEST", body_part="CHEST",
                series_description="LUNG")
    first = site.series(chest, 20, 1, study_description="CT CHEST", body_part="CHEST",
                        series_description="AXIAL", shuffle=False)
    top = max(first, key=lambda ds: ds.ImagePositionPatient[2])
    # Before the worker's sweep has cached the metadata, the page does not wait to make
    # it: searches and metadata are still fetched ahead, the frame is not.
    early = site.first(chest, sweep=False)
    assert len(early) == 5 and not any("/frames/" in u for u in early)
    assert _frame(site.first(chest)) == top.SOPInstanceUID


def test_unknown_or_malformed_studies_preload_nothing(site: Site):
    assert site.first(generate_uid()) == []
    assert vp.first_requests(site.conn, "1.2.3'; DROP TABLE studies") == []
    assert vp.first_requests(site.conn, "1." + "2" * 80) == []


def test_is_head_by_body_part_or_words_not_by_cta_alone():
    def study(desc):
        return {"study_description": desc}

    def series(modality="CT", part="", desc=""):
        return {"modality": modality, "body_part": part, "series_description": desc}

    assert vp.is_head_study(study(""), [series(part="BRAIN")])
    assert vp.is_head_study(study("CTA HEAD AND NECK"), [series()])
    assert vp.is_head_study(study(""), [series(desc="Stroke perfusion")])
    assert not vp.is_head_study(study("CTA CHEST PE"), [series()])
    assert not vp.is_head_study(study("MR BRAIN"), [series(modality="MR", part="BRAIN")])
