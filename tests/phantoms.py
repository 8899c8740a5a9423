"""Images that compress like real ones, made by the tests (no blobs in git).

A head CT slice (skull, brain, ventricles, ~5 HU noise) at 512×512, stored
signed (HU, Bits Stored 12, negative values) or unsigned (HU + 1024 with
Rescale Intercept -1024); an MR slice, a CR plate and an RGB ultrasound frame
with the sizes and bit depths those scanners produce.  Uniform random noise
would not do: no codec compresses it, and progressive previews of it mean
nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)


def _ellipse(rows: int, cols: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[:rows, :cols]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def head_hu(index: int = 0, size: int = 512, seed: int = 0) -> np.ndarray:
    """One axial head slice in HU: air, scalp, skull, brain (grey/white), ventricles, noise."""
    rng = np.random.default_rng(seed + index)
    c = size / 2
    shrink = 1.0 - 0.002 * index  # the head narrows from slice to slice
    hu = np.full((size, size), -1000.0)
    hu[_ellipse(size, size, c, c, 0.42 * size * shrink, 0.36 * size * shrink)] = 30  # scalp
    hu[_ellipse(size, size, c, c, 0.40 * size * shrink, 0.34 * size * shrink)] = 1200  # skull
    brain = _ellipse(size, size, c, c, 0.37 * size * shrink, 0.31 * size * shrink)
    y, x = np.mgrid[:size, :size]
    hu[brain] = 38 - 8 * (np.hypot(y - c, x - c)[brain] < 0.2 * size)  # grey, white matter
    for dx in (-0.05, 0.05):  # lateral ventricles
        hu[_ellipse(size, size, c - 0.02 * size, c + dx * size, 0.09 * size, 0.025 * size)] = 5
    hu += rng.normal(0, 5, hu.shape)
    return np.round(hu)


def _dataset(modality: str, sop_class: str, study_uid: str, series_uid: str, index: int,
             patient_id: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = \
        patient_id, "PHANTOM^HEAD", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "101500", "PH1", "1"
    ds.StudyDescription = "CT HEAD W/O CONTRAST" if modality == "CT" else f"{modality} PHANTOM"
    ds.SeriesDescription, ds.InstitutionName = "AXIAL", "Field Hospital"
    ds.ReferringPhysicianName = "REF^DOC"
    ds.Modality, ds.BodyPartExamined, ds.SeriesNumber = modality, "HEAD", 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, float(index) * 5.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [0.45, 0.45], 5.0
    return ds


def _grey(ds: Dataset, pixels: np.ndarray, bits_stored: int, signed: bool) -> Dataset:
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    return ds


def ct(study_uid: str, series_uid: str, index: int, *, signed: bool = True, size: int = 512,
       patient_id: str = "PHANTOM") -> Dataset:
    """A head CT slice: signed (stored HU, negative values) or unsigned (intercept -1024)."""
    ds = _dataset("CT", CTImageStorage, study_uid, series_uid, index, patient_id)
    hu = head_hu(index, size)
    ds.RescaleSlope, ds.RescaleType = 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 80
    if signed:
        ds.RescaleIntercept = 0
        return _grey(ds, np.clip(hu, -2048, 2047), 12, True)
    ds.RescaleIntercept = -1024
    return _grey(ds, np.clip(hu + 1024, 0, 4095), 12, False)


def mr(study_uid: str, series_uid: str, index: int = 0) -> Dataset:
    """A 256×256 T2-like brain slice, 16-bit unsigned, Bits Stored 12."""
    ds = _dataset("MR", MRImageStorage, study_uid, series_uid, index, "PHANTOM")
    hu = head_hu(index, 256, seed=7)
    signal = np.where(hu > 500, 80, np.where(hu < -500, 0, 900 + 20 * (40 - hu)))
    signal += np.random.default_rng(index).normal(0, 12, signal.shape)
    return _grey(ds, np.clip(np.round(signal), 0, 4095), 12, False)


def cr(study_uid: str, series_uid: str) -> Dataset:
    """A 2048×1664 chest-plate-like radiograph, 16-bit unsigned, Bits Stored 12."""
    ds = _dataset("CR", ComputedRadiographyImageStorage, study_uid, series_uid, 0, "PHANTOM")
    rows, cols = 2048, 1664
    y, x = np.mgrid[:rows, :cols]
    body = 2600 - 900 * _ellipse(rows, cols, rows * 0.5, cols * 0.3, rows * 0.35, cols * 0.17) \
        - 900 * _ellipse(rows, cols, rows * 0.5, cols * 0.7, rows * 0.35, cols * 0.17)
    ribs = 250 * (np.sin(y / 40.0) > 0.7)
    img = body + ribs + 300 * np.exp(-((x - cols / 2) / 60.0) ** 2)
    img += np.random.default_rng(3).normal(0, 15, img.shape)
    return _grey(ds, np.clip(np.round(img), 0, 4095), 12, False)


def us(study_uid: str, series_uid: str) -> Dataset:
    """A 640×480 RGB ultrasound frame (speckled sector with a coloured overlay), 8-bit."""
    ds = _dataset("US", UltrasoundImageStorage, study_uid, series_uid, 0, "PHANTOM")
    rows, cols = 480, 640
    y, x = np.mgrid[:rows, :cols]
    angle, radius = np.arctan2(x - cols / 2, y + 20), np.hypot(x - cols / 2, y + 20)
    sector = (np.abs(angle) < 0.6) & (radius < 470)
    rng = np.random.default_rng(5)
    grey = np.where(sector, 90 + 40 * np.sin(radius / 25.0) + rng.rayleigh(20, (rows, cols)), 0)
    img = np.repeat(np.clip(grey, 0, 255)[..., None], 3, axis=2)
    overlay = _ellipse(rows, cols, 240, 320, 40, 60) & sector
    img[overlay] = [200, 30, 30]
    img[10:30, 10:200] = [255, 255, 0]  # a yellow annotation bar
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = img.astype(np.uint8).tobytes()
    return ds


def write(ds: Dataset, out_dir: Path, name: str) -> Path:
    """Save as a Part 10 file and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
