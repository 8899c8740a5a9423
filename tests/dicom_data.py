"""Test data made by the tests: CT/MR/CR series generated with pydicom, no blobs in git."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage, "CR": ComputedRadiographyImageStorage}


def make_instance(
    study_uid: str, series_uid: str, index: int, *, modality: str = "CT", rows: int = 64,
    cols: int = 64, patient_id: str = "PAT001", patient_name: str = "DOE^JANE",
    study_description: str = "CT HEAD W/O CONTRAST", body_part: str = "HEAD",
    series_description: str = "AXIAL 5MM", study_date: str | None = None,
    accession: str = "ACC001", institution: str = "Field Hospital", seed: int | None = None,
    sop_uid: str | None = None,
) -> Dataset:
    """One image with realistic header fields and pixel data of the given size (16-bit)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate = study_date or dt.date.today().strftime("%Y%m%d")
    ds.StudyTime = "101500"
    ds.SeriesDate = ds.StudyDate
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.ReferringPhysicianName = "REF^DOC"
    ds.InstitutionName = institution
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index) * 0.5]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = 0.5
    ds.PixelSpacing = [0.5, 0.5]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = 40, 80
    rng = np.random.default_rng(seed if seed is not None else index)
    pixels = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def write_series(
    out_dir: Path, count: int, *, modality: str = "CT", rows: int = 64, cols: int = 64,
    study_uid: str | None = None, **kwargs,
) -> tuple[str, str, list[Path]]:
    """Write ``count`` instances of one new series; return (study_uid, series_uid, paths)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for i in range(count):
        ds = make_instance(study_uid, series_uid, i, modality=modality, rows=rows, cols=cols,
                           **kwargs)
        path = out_dir / f"{modality}{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, series_uid, paths
