"""One volume in the cohort store: a Zarr v3 group that is also an OME-Zarr 0.5 image.

``volumes/{id}/``      group: OME ``multiscales`` (axes x, y, z in millimetres, voxel spacing
                       and origin) and ``ct_factory`` (full affine, HU window, the record)
``volumes/{id}/hu``    int16 HU, (x, y, z) on a RAS+ grid; one shard, 64^3 inner chunks,
                       Blosc zstd level 3 with byte shuffle
``volumes/{id}/labels/anatomy/0``
                       uint8 anatomy label image, bit k set where channel k is present (masks
                       may overlap), Blosc zstd with bit shuffle; an OME ``image-label``

Only zarr and numpy here: readers in any language open these groups with a zarr v3 library.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.storage import MemoryStore

from factory.anatomy import pack_masks, unpack_masks
from factory.errors import CtFactoryError

FORMAT = "ct-factory cohort v1"
OME_VERSION = "0.5"
IMAGE = "hu"
ANATOMY = "labels/anatomy"
ANATOMY_LEVEL = "0"
INNER_CHUNK = 64
HU_FILL = -1000  # air: what a reader sees outside the volume, never inside (chunks are all written)
AXES = ("x", "y", "z")
# Colours of the anatomy channels in OME viewers (bit k -> label value 2**k).
CHANNEL_COLOURS = ((70, 130, 255), (255, 215, 0), (220, 20, 60), (255, 105, 180))


class VolumeFormatError(CtFactoryError, ValueError):
    """A stored volume that does not match the layout above; the message names the volume."""


@dataclass
class StoredVolume:
    """A volume as read back from the store."""

    volume_id: str
    hu: np.ndarray
    masks: dict[str, np.ndarray]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    hu_window: tuple[float, float]
    record: dict = field(default_factory=dict)


def chunking(shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Inner chunks of 64 voxels (smaller axes whole) and one shard covering the volume."""
    chunks = tuple(min(INNER_CHUNK, int(s)) for s in shape)
    shards = tuple(-(-int(s) // c) * c for s, c in zip(shape, chunks, strict=True))
    return chunks, shards


def sha256(array: np.ndarray) -> str:
    """Checksum of an array's values: little-endian, C order (what the store holds)."""
    data = np.ascontiguousarray(array)
    little = data.astype(data.dtype.newbyteorder("<"), copy=False)
    return hashlib.sha256(little.tobytes()).hexdigest()


def intensity_stats(hu: np.ndarray) -> dict[str, float]:
    """Simple HU statistics for the manifest (mean, sd, 1st/50th/99th percentiles)."""
    p01, p50, p99 = np.percentile(hu, (1, 50, 99))
    return {
        "hu_mean": float(hu.mean()),
        "hu_std": float(hu.std()),
        "hu_p01": float(p01),
        "hu_p50": float(p50),
        "hu_p99": float(p99),
    }


def _multiscales(name: str, path: str, affine: np.ndarray, spacing: Sequence[float]) -> list:
    transforms: list[dict] = [{"type": "scale", "scale": [float(s) for s in spacing]}]
    if np.allclose(affine[:3, :3], np.diag(spacing)):  # axis-aligned RAS+: origin is exact
        transforms.append({"type": "translation", "translation": affine[:3, 3].tolist()})
    return [
        {
            "name": name,
            "axes": [{"name": a, "type": "space", "unit": "millimeter"} for a in AXES],
            "datasets": [{"path": path, "coordinateTransformations": transforms}],
        }
    ]


def _array(group: zarr.Group, name: str, data: np.ndarray, shuffle: BloscShuffle, fill: int):
    chunks, shards = chunking(data.shape)
    array = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle=shuffle),
        fill_value=fill,
        dimension_names=AXES,
        config={"write_empty_chunks": True},  # every chunk stored: missing means damaged
    )
    array[...] = data
    return array


@dataclass
class EncodedVolume:
    """A volume group as the objects of its store (key under the group -> bytes), encoded
    in memory, and the checksums of its arrays: writing it is one PUT per object."""

    objects: dict[str, bytes]
    sums: dict[str, str]

    @property
    def nbytes(self) -> int:
        """What the volume takes in the store (the sum of its objects)."""
        return sum(len(b) for b in self.objects.values())


def encode_volume(
    volume_id: str,
    hu: np.ndarray,
    masks: Mapping[str, np.ndarray],
    affine: np.ndarray,
    spacing: Sequence[float],
    hu_window: Sequence[float],
    record: Mapping,
) -> EncodedVolume:
    """One volume group (the layout above) encoded by zarr into memory.

    Encoding apart from writing keeps the store's traffic to one PUT per object (no listing,
    existence check or metadata rewrite that zarr's own group creation makes on a remote
    store), and makes a retried write put the very same bytes again.
    """
    if hu.dtype != np.int16 or hu.ndim != 3:
        raise VolumeFormatError(
            f"{volume_id}: HU must be a 3D int16 array, got {hu.dtype} {hu.shape}"
        )
    channels = list(masks)
    info = {
        "format": FORMAT,
        "affine": np.asarray(affine, float).tolist(),
        "spacing_mm": [float(s) for s in spacing],
        "orientation": "RAS+",
        "hu": {"dtype": "int16", "units": "HU", "window": [float(v) for v in hu_window]},
        "anatomy": {"encoding": "bits", "channels": channels},
        "record": dict(record),
    }
    buffers: dict = {}
    group = zarr.create_group(
        MemoryStore(buffers),
        zarr_format=3,
        attributes={
            "ome": {
                "version": OME_VERSION,
                "multiscales": _multiscales(volume_id, IMAGE, affine, spacing),
            },
            "ct_factory": info,
        },
    )
    _array(group, IMAGE, hu, BloscShuffle.shuffle, HU_FILL)
    sums = {"hu_sha256": sha256(hu), "anatomy_sha256": ""}
    if channels:
        packed = pack_masks(masks, channels)
        colours = [
            {"label-value": 1 << k, "rgba": [*CHANNEL_COLOURS[k % len(CHANNEL_COLOURS)], 255]}
            for k in range(len(channels))
        ]
        labels = group.create_group(
            "labels", attributes={"ome": {"version": OME_VERSION, "labels": ["anatomy"]}}
        )
        anatomy = labels.create_group(
            "anatomy",
            attributes={
                "ome": {
                    "version": OME_VERSION,
                    "multiscales": _multiscales("anatomy", ANATOMY_LEVEL, affine, spacing),
                    "image-label": {"colors": colours, "source": {"image": "../../"}},
                }
            },
        )
        _array(anatomy, ANATOMY_LEVEL, packed, BloscShuffle.bitshuffle, 0)
        sums["anatomy_sha256"] = sha256(packed)
    return EncodedVolume({key: buffer.to_bytes() for key, buffer in buffers.items()}, sums)


def read_volume(volumes: zarr.Group, volume_id: str, masks: bool = True) -> StoredVolume:
    """Read a volume group back (``verify`` checks that no chunk is missing)."""
    try:
        group = volumes[volume_id]
        info = group.attrs["ct_factory"]
        hu = np.asarray(group[IMAGE][...])
        channels = info["anatomy"]["channels"]
        packed = np.asarray(group[ANATOMY][ANATOMY_LEVEL][...]) if masks and channels else None
    except KeyError as exc:
        raise VolumeFormatError(f"{volume_id}: incomplete volume: missing {exc}") from None
    return StoredVolume(
        volume_id=volume_id,
        hu=hu,
        masks=unpack_masks(packed, channels) if packed is not None else {},
        affine=np.asarray(info["affine"]),
        spacing=tuple(info["spacing_mm"]),
        hu_window=tuple(info["hu"]["window"]),
        record=info["record"],
    )


def missing_chunks(fs, array_path: str, array: zarr.Array) -> list[str]:
    """Shards absent from the store, or inner chunks absent from a shard's index.

    zarr reads either as fill values without a word, so verification looks for them itself:
    a sharded array's index (at the shard's end) holds (offset, size) per inner chunk, with
    2**64 - 1 for a chunk that was never written.
    """
    shards = array.shards or array.chunks
    per_axis = [-(-s // c) for s, c in zip(array.shape, shards, strict=True)]
    inner = int(np.prod([s // c for s, c in zip(shards, array.chunks, strict=True)]))
    index_bytes = inner * 16 + 4  # uint64 pairs and a crc32c
    problems = []
    for key in np.ndindex(*per_axis):
        name = "c/" + "/".join(str(k) for k in key)
        path = f"{array_path}/{name}"
        try:
            tail = fs.cat_file(path, start=-index_bytes)
        except FileNotFoundError:
            problems.append(f"shard {name} is missing")
            continue
        entries = np.frombuffer(tail[: inner * 16], "<u8").reshape(inner, 2)
        absent = int((entries == np.iinfo(np.uint64).max).all(axis=1).sum())
        if absent:
            problems.append(f"shard {name}: {absent} of {inner} inner chunks are missing")
    return problems


def check_volume(
    volumes: zarr.Group, volume_id: str, expected: Mapping, fs=None, path: str = ""
) -> list[str]:
    """What is wrong with a stored volume against its manifest row (empty if nothing).

    With ``fs`` and the volume's ``path`` on it, absent shards and chunks are found too.
    """
    try:
        group = volumes[volume_id]
        info = group.attrs["ct_factory"]
        hu = np.asarray(group[IMAGE][...])
        channels = info["anatomy"]["channels"]
        packed = np.asarray(group[ANATOMY][ANATOMY_LEVEL][...]) if channels else None
    except Exception as exc:  # a truncated shard or an absent array
        return [f"unreadable: {type(exc).__name__}: {exc}"]
    problems = []
    if fs is not None:
        problems += missing_chunks(fs, f"{path}/{IMAGE}", group[IMAGE])
        if packed is not None:
            problems += missing_chunks(
                fs, f"{path}/{ANATOMY}/{ANATOMY_LEVEL}", group[ANATOMY][ANATOMY_LEVEL]
            )
    shape = [int(s) for s in expected["shape"]]
    if list(hu.shape) != shape:
        problems.append(f"hu shape {list(hu.shape)} != manifest {shape}")
    if hu.dtype != np.int16:
        problems.append(f"hu dtype {hu.dtype} != int16")
    if sha256(hu) != expected["hu_sha256"]:
        problems.append("hu checksum differs from the manifest")
    got = sha256(packed) if packed is not None else ""
    if got != (expected.get("anatomy_sha256") or ""):
        problems.append("anatomy checksum differs from the manifest")
    return problems
