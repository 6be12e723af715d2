"""Generated volumes as response bodies: NIfTI, .npy, a Zarr zip store, or a PNG preview.

The preview is drawn with numpy and Pillow (no matplotlib figure) so that a UI gets it fast:
three mid-planes in the lung and mediastinal windows, resampled to square millimetres.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import zarr
from PIL import Image, ImageDraw
from zarr.storage import MemoryStore

from factory.models.generator import Volume
from factory.store.layout import encode_volume
from factory.viz import WINDOWS, planes, windowed

MEDIA_TYPES = {
    "nifti": "application/gzip",
    "npy": "application/octet-stream",
    "zarr": "application/zip",
    "png": "image/png",
    "segmentation": "application/gzip",
    "anatomy": "application/gzip",
}
SUFFIXES = {
    "nifti": ".nii.gz",
    "npy": ".npy",
    "zarr": ".zarr.zip",
    "png": ".png",
    "segmentation": ".anatomy.nii.gz",
    "anatomy": ".anatomy.nii.gz",
}
PREVIEW_PX = 192  # longest side of each plane in the preview


def npy_bytes(volume: Volume) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(volume.hu, np.int16), allow_pickle=False)
    return buffer.getvalue()


def zarr_zip_bytes(volume: Volume, volume_id: str, hu_window, record: dict) -> bytes:
    """The cohort store's volume layout (OME-Zarr 0.5, masks as a label image) as group
    ``volume_id`` of a root group, in a zip (stored: the chunks are compressed already)."""
    args = (volume.hu, volume.masks, volume.affine, volume.spacing, hu_window, record)
    encoded = encode_volume(volume_id, *args)
    root: dict = {}
    zarr.create_group(MemoryStore(root), zarr_format=3)
    objects = {key: buffer.to_bytes() for key, buffer in root.items()}
    objects |= {f"{volume_id}/{key}": data for key, data in encoded.objects.items()}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for key in sorted(objects):
            archive.writestr(key, objects[key])
    return buffer.getvalue()


def preview_png(volume: Volume, caption: str = "") -> bytes:
    """2 x 3 grid: lung and mediastinal windows x axial, coronal, sagittal mid-planes."""
    sx, sy, sz = volume.spacing
    extent = {"axial": (sx, sy), "coronal": (sx, sz), "sagittal": (sy, sz)}  # (col, row) mm
    views = planes(np.asarray(volume.hu, np.float32))
    tiles = []
    for level, width in WINDOWS.values():
        row = []
        for name, image in views.items():
            col_mm, row_mm = extent[name]
            h, w = image.shape
            scale = PREVIEW_PX / max(h * row_mm, w * col_mm)
            size = (max(1, round(w * col_mm * scale)), max(1, round(h * row_mm * scale)))
            tile = Image.fromarray(windowed(image, level, width)).resize(size, Image.BILINEAR)
            row.append(tile)
        tiles.append(row)
    pad, text_h = 4, 16 if caption else 0
    width = sum(t.width for t in tiles[0]) + pad * 4
    height = sum(max(t.height for t in row) for row in tiles) + pad * 3 + text_h
    canvas = Image.new("L", (width, height), 0)
    y = pad
    for row in tiles:
        x = pad
        for tile in row:
            canvas.paste(tile, (x, y))
            x += tile.width + pad
        y += max(t.height for t in row) + pad
    if caption:
        ImageDraw.Draw(canvas).text((pad, y), caption[:120], fill=200)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
