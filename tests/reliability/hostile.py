"""Generated bad inputs for the receive step, by category.

Each :class:`Case` is a DICOM file whose file meta is sound (pynetdicom reads
the request's Affected SOP Class/Instance UID and the transfer syntax from
it) and whose dataset bytes are whatever the category needs; pynetdicom
streams them as they are (``STORE_SEND_CHUNKED_DATASET``).

Expected answers (PS3.4 B.2.3; node/ingest.py): bytes that do not parse under
the negotiated transfer syntax 0xC210; missing, malformed or contradicting
identifying attributes 0xA900; over-long values and large but well-formed
content are stored. Never 0xA700: that is for the node's own disk or index.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from tests.reliability.support import SOP_CLASS

ACCEPTED = frozenset({0x0000})
CANNOT_UNDERSTAND = frozenset({0xC210})
MISMATCH = frozenset({0xA900})
REFUSED = CANNOT_UNDERSTAND | MISMATCH


@dataclass(frozen=True)
class Case:
    category: str
    name: str
    body: bytes
    sop_class: str
    request_uid: str  # Affected SOP Instance UID of the request
    transfer_syntax: str
    expect: frozenset[int]

    def write(self, path: Path) -> Path:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = self.sop_class
        meta.MediaStorageSOPInstanceUID = self.request_uid
        meta.TransferSyntaxUID = self.transfer_syntax
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
        fp = DicomBytesIO()
        fp.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fp, meta, enforce_standard=True)
        path.write_bytes(fp.getvalue() + self.body)
        return path


def encode(ds: Dataset, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def base(modality: str = "CT", size: int = 16, rng: random.Random | None = None) -> Dataset:
    rng = rng or random.Random(0)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SOP_CLASS[modality]
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "HOSTILE^INPUT", f"H{rng.randrange(10**6)}", "ACC1"
    ds.SeriesDescription = "hostile input"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(rng.randrange(2**32)).integers(0, 4096, (size, size), np.uint16).tobytes()
    return ds


def _case(category, name, ds_or_body, expect, *, ts=ExplicitVRLittleEndian, request_uid=None, sop_class=None, ds=None):
    ds = ds if ds is not None else ds_or_body if isinstance(ds_or_body, Dataset) else None
    body = encode(ds_or_body) if isinstance(ds_or_body, Dataset) else ds_or_body
    return Case(
        category,
        name,
        body,
        sop_class or (str(ds.SOPClassUID) if ds is not None else SOP_CLASS["CT"]),
        request_uid or (str(ds.SOPInstanceUID) if ds is not None else generate_uid()),
        str(ts),
        expect,
    )


def _element(group: int, elem: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One Explicit VR Little Endian element; ``length`` may lie."""
    n = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF", b"OD", b"OL", b"UC", b"UR"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, n) + value
    return struct.pack("<HH2sH", group, elem, vr, n) + value


def _item(content: bytes, defined: bool) -> bytes:
    if defined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content
    return struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + content + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)


def _sequence(group: int, elem: int, items: bytes, defined: bool) -> bytes:
    if defined:
        return _element(group, elem, b"SQ", items)
    return _element(group, elem, b"SQ", items, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _splice(ds: Dataset, raw: bytes, before_group: int) -> bytes:
    """``ds`` encoded with ``raw`` inserted before the first element of a
    group >= ``before_group`` (elements stay in ascending tag order)."""
    low, high = Dataset(), Dataset()
    for elem in ds:
        (low if elem.tag.group < before_group else high).add(elem)
    return encode(low) + raw + encode(high)


# -- categories ---------------------------------------------------------------------------
# Each yields cases for variant i = 0, 1, 2, ... (modality and size vary with i).

_MODALITIES = ("CT", "MR", "CR")


def _ds(i: int, seed: str) -> Dataset:
    rng = random.Random(f"{seed}-{i}")
    return base(_MODALITIES[i % 3], (16, 32, 64)[(i // 3) % 3], rng)


def truncated(i: int) -> Iterator[Case]:
    ds = _ds(i, "truncated")
    full = encode(ds)
    yield _case("truncated", "cut at byte 300", full[:300], REFUSED, ds=ds)
    for n in (1, 2, 7, 100):
        yield _case("truncated", f"last {n} bytes removed", full[:-n], CANNOT_UNDERSTAND, ds=ds)
    # An element after the Pixel Data that declares 5000 bytes and has none.
    for name, tag in (("trailing padding", (0xFFFC, 0xFFFC)), ("private element", (0x7FE1, 0x1010))):
        body = full + _element(*tag, b"OB", b"", 5000)
        yield _case("truncated", f"{name} after pixels declares 5000 bytes, has none", body, CANNOT_UNDERSTAND, ds=ds)


def uid_vr(i: int) -> Iterator[Case]:
    vrs = [("US", 7), ("UL", 7), ("SS", 7), ("SL", 7), ("FD", 7.0), ("FL", 7.0)]
    vr, value = vrs[i % len(vrs)]
    for keyword, tag in (
        ("SOPInstanceUID", 0x00080018),
        ("StudyInstanceUID", 0x0020000D),
        ("SeriesInstanceUID", 0x0020000E),
        ("SOPClassUID", 0x00080016),
    ):
        ds = _ds(i, f"uidvr-{keyword}")
        del ds[tag]
        ds.add_new(tag, vr, value)
        # The request names the same "7", so only the VR gives it away.
        request = "7" if keyword == "SOPInstanceUID" else str(ds.SOPInstanceUID)
        sop_class = SOP_CLASS[str(ds.Modality)] if keyword == "SOPClassUID" else None
        name = f"{keyword} as {vr} {value}"
        yield _case("uid_non_ui_vr", name, encode(ds), MISMATCH, ds=ds, request_uid=request, sop_class=sop_class)


def overlong(i: int) -> Iterator[Case]:
    fill = "XYZ_0123456789"[i % 14]
    sizes = (("Modality", 10), ("PatientID", 60), ("AccessionNumber", 3), ("SeriesDescription", 20))  # KiB
    for keyword, kib in sizes:
        length = kib * 1024
        ds = _ds(i, f"overlong-{keyword}")
        current = str(ds.get(keyword, ""))
        setattr(ds, keyword, (current + fill * length)[:length])
        yield _case("overlong_values", f"{length // 1024} KB {keyword}", ds, ACCEPTED)


def ts_lies(i: int) -> Iterator[Case]:
    ds = _ds(i, "tslie")
    yield _case("ts_lie", "implicit VR body, Explicit VR context", encode(ds, implicit=True), CANNOT_UNDERSTAND, ds=ds)
    name = "explicit VR body, Implicit VR context"
    yield _case("ts_lie", name, encode(ds), CANNOT_UNDERSTAND, ds=ds, ts=ImplicitVRLittleEndian)
    jpeg = [JPEGBaseline8Bit, JPEG2000Lossless, RLELossless][i % 3]
    ds8 = _ds(i, "native-in-jpeg")
    if jpeg == JPEGBaseline8Bit:
        ds8.BitsAllocated, ds8.BitsStored, ds8.HighBit = 8, 8, 7
        ds8.PixelData = bytes(ds8.Rows * ds8.Columns)
    yield _case("ts_lie", f"native pixel data, {jpeg.name} context", ds8, CANNOT_UNDERSTAND, ts=jpeg)
    enc = _ds(i, "encaps-in-native")
    del enc.PixelData
    fragment = b"\xff\xd8" + bytes(62) + b"\xff\xd9"
    pixels = (
        _element(0x7FE0, 0x0010, b"OB", b"", 0xFFFFFFFF)
        + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
        + struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment))
        + fragment
        + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    )
    name = "encapsulated pixel data, Explicit VR Little Endian context"
    yield _case("ts_lie", name, encode(enc) + pixels, CANNOT_UNDERSTAND, ds=enc)


def escape_token(token: str) -> str:
    return f"ainode-escape-{token}"


def path_uids(i: int, token: str) -> Iterator[Case]:
    values = [
        "../../etc",
        "1.2/../3",
        "1.2.3/4.5",
        "/etc/passwd",
        "..",
        f"1.2/../../../../../../../../../../tmp/{escape_token(token)}",
        "1." + "2" * 70,
        "1.2.3" + ".4" * 40,
        "1.2.840..10008",
        "1.2.3\\..\\..\\4",  # three values: a backslash is the value delimiter
    ]
    value = values[i % len(values)] if i < len(values) else f"{values[i % len(values)]}.{i}"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        ds = _ds(i, f"path-{keyword}")
        setattr(ds, keyword, value)
        # The request carries the same value where pynetdicom can send it
        # (1 to 64 characters, one value).
        request = value if keyword == "SOPInstanceUID" and len(value) <= 64 and "\\" not in value else None
        if keyword == "SOPInstanceUID" and request is None:
            request = generate_uid()
        request = request or str(ds.SOPInstanceUID)
        yield _case("path_traversal_uids", f"{keyword} {value[:40]!r}", ds, MISMATCH, request_uid=request)


def deep_sequences(i: int) -> Iterator[Case]:
    depth, defined = [(200, False), (200, True), (64, False), (1000, False), (500, True)][i % 5]
    creator = _element(0x0009, 0x0010, b"LO", b"RELIABILITY ")
    nested = _sequence(0x0009, 0x1001, _item(creator, defined), defined)
    for _ in range(depth - 1):
        nested = _sequence(0x0009, 0x1001, _item(creator + nested, defined), defined)
    ds = _ds(i, "deep")
    body = _splice(ds, creator + nested, 0x0010)
    # Valid DICOM, however deep: stored, or refused as not understood; never a crash.
    name = f"{depth} levels, {'defined' if defined else 'undefined'} lengths"
    yield _case("deep_sequences", name, body, ACCEPTED | CANNOT_UNDERSTAND, ds=ds)


def huge_private(i: int) -> Iterator[Case]:
    vr = (b"OB", b"UN")[i % 2]
    value = np.random.default_rng(i).integers(0, 256, 8 * 1024 * 1024, np.uint8).tobytes()
    ds = _ds(i, "huge")
    raw = _element(0x0009, 0x0010, b"LO", b"RELIABILITY ") + _element(0x0009, 0x1002, vr, value)
    yield _case("huge_private", f"8 MB private {vr.decode()}", _splice(ds, raw, 0x0010), ACCEPTED, ds=ds)


def mismatch(i: int) -> Iterator[Case]:
    ds = _ds(i, "mismatch")
    yield _case("sop_mismatch", "SOP Instance UID differs from the request", ds, MISMATCH, request_uid=generate_uid())
    other = SOP_CLASS[_MODALITIES[(i + 1) % 3]]
    yield _case("sop_mismatch", "SOP Class UID differs from the request", ds, MISMATCH, sop_class=other)


def empty(i: int) -> Iterator[Case]:
    bodies = [
        ("empty dataset", b""),
        ("only Patient Name", _element(0x0010, 0x0010, b"PN", b"EMPTY^ONLY")),
        ("only Specific Character Set", _element(0x0008, 0x0005, b"CS", b"ISO_IR 100")),
        ("only a sequence delimiter", struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)),
    ]
    name, body = bodies[i % len(bodies)]
    yield _case("empty_dataset", name, body, REFUSED)


def garbage(i: int) -> Iterator[Case]:
    rng = random.Random(f"garbage-{i}")
    n = rng.choice([1, 3, 16, 200, 4096, 65537, 300_000])
    noise = rng.randbytes(n)
    if i % 3 == 2:  # a sound header, then noise
        noise = encode(_ds(i, "garbage"))[:180] + noise
    yield _case("garbage_bytes", f"{len(noise)} random bytes", noise, REFUSED)


#: category -> (generator of variant i, share of the inputs, or a fixed count)
CATEGORIES: dict[str, tuple[Callable[..., Iterator[Case]], float | int]] = {
    "truncated": (truncated, 0.20),
    "uid_non_ui_vr": (uid_vr, 0.14),
    "overlong_values": (overlong, 0.08),
    "ts_lie": (ts_lies, 0.12),
    "path_traversal_uids": (path_uids, 0.16),
    "deep_sequences": (deep_sequences, 5),
    "huge_private": (huge_private, 2),
    "sop_mismatch": (mismatch, 0.08),
    "empty_dataset": (empty, 0.04),
    "garbage_bytes": (garbage, 0.18),
}


def generate(total: int, token: str) -> dict[str, list[Case]]:
    """About ``total`` cases over every category (each at least once)."""
    fixed = sum(v for _, v in CATEGORIES.values() if isinstance(v, int))
    out: dict[str, list[Case]] = {}
    for name, (gen, share) in CATEGORIES.items():
        want = share if isinstance(share, int) else max(1, math.ceil((total - fixed) * share))
        cases: list[Case] = []
        i = 0
        while len(cases) < want:
            cases += list(gen(i, token) if gen is path_uids else gen(i))
            i += 1
        out[name] = cases[: max(want, 1)]
    return out
