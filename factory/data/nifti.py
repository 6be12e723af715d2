"""NIfTI-1 encoding with a real affine, byte-reproducible (.nii.gz with a zero gzip mtime), and
the matching reader."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np


def nifti_bytes(array: np.ndarray, affine: np.ndarray, compresslevel: int = 6) -> bytes:
    """Gzipped NIfTI-1 of ``array`` (kept in its dtype) with ``affine`` as qform and sform (mm)."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)  # scanner anatomical
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=compresslevel, mtime=0)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_nifti(path: str | Path) -> np.ndarray:
    """A NIfTI volume as stored (dtype kept), reoriented to RAS+ (x, y, z)."""
    image = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(image.dataobj)
