"""DICOMweb (QIDO, WADO metadata and frames, STOW) and the OHIF viewer with its head start."""
