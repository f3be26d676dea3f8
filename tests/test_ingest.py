"""node/ingest.py: the accept-or-refuse decision on encoded bytes (no network)."""

from __future__ import annotations

import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from node.ingest import Accepted, MalformedDataset, Refused, Status, check_encoding, check_instance, index_values

# Real files in every syntax family: implicit, explicit, big endian, deflated,
# encapsulated (JPEG, JPEG 2000, RLE), nested undefined-length sequences.
VALID = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
    "JPEG2000.dcm", "SC_rgb_rle.dcm", "SC_rgb_dcmtk_+eb+cr.dcm", "color-pl.dcm", "rtplan.dcm",
    "emri_small_jpeg_2k_lossless.dcm", "waveform_ecg.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm",
]


def _file(name: str) -> tuple[bytes, str]:
    path = Path(get_testdata_file(name))
    return path.read_bytes(), str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


@pytest.mark.parametrize("name", VALID)
def test_valid_files_walk_to_their_end_and_are_accepted(name):
    data, ts = _file(name)
    check_encoding(data, ts)
    decision = check_instance(data, ts)
    assert isinstance(decision, Accepted), decision
    assert decision.transfer_syntax_uid == ts


@pytest.mark.parametrize(
    "name, error",
    [
        ("MR_truncated.dcm", "declares 8192 bytes"),  # pixel data cut short
        ("rtplan_truncated.dcm", "declares 976 bytes"),  # a sequence cut short
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "too few for an element header"),  # no sequence delimiter
        ("SC_rgb_jpeg.dcm", "not a DICOM VR"),  # implicit VR body labelled JPEG Baseline
    ],
)
def test_damaged_files_of_pydicom_are_refused_c210(name, error):
    data, ts = _file(name)
    decision = check_instance(data, ts)
    assert isinstance(decision, Refused) and decision.status == Status.CANNOT_UNDERSTAND
    assert error in decision.reason


def _prefix_and_body(name: str) -> tuple[bytes, bytes, str]:
    """(preamble + file meta, dataset, transfer syntax) of a pydicom test file."""
    data, ts = _file(name)
    fp = pydicom.filebase.DicomBytesIO(data)
    pydicom.filereader.read_preamble(fp, False)
    pydicom.filereader._read_file_meta_info(fp)
    return data[: fp.tell()], data[fp.tell() :], ts


def test_deflated_dataset_is_inflated_and_walked():
    prefix, body, ts = _prefix_and_body("image_dfl.dcm")
    assert ts == DeflatedExplicitVRLittleEndian
    with pytest.raises(MalformedDataset, match="truncated"):
        check_encoding(prefix + body[:-20], ts)
    # A deflate stream that inflates to a damaged dataset is caught too.
    inflated = zlib.decompress(body, -zlib.MAX_WBITS)
    bad = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    damaged = bad.compress(inflated[:-3]) + bad.flush()
    with pytest.raises(MalformedDataset, match="remain|too few"):
        check_encoding(prefix + damaged, ts)


def test_encapsulated_pixel_data_under_a_native_syntax_refused():
    prefix, body, ts = _prefix_and_body("SC_rgb_rle.dcm")
    assert ts == RLELossless
    decision = check_instance(prefix + body, ExplicitVRLittleEndian)
    assert isinstance(decision, Refused) and "native syntax" in decision.reason


def test_explicit_body_under_implicit_syntax_refused():
    prefix, body, _ = _prefix_and_body("CT_small.dcm")
    with pytest.raises(MalformedDataset):
        check_encoding(prefix + body, ImplicitVRLittleEndian)


def test_trailing_bytes_and_stray_delimiters_refused():
    prefix, body, ts = _prefix_and_body("CT_small.dcm")
    with pytest.raises(MalformedDataset, match="too few"):
        check_encoding(prefix + body + b"\0\0\0", ts)
    with pytest.raises(MalformedDataset, match="item tag"):
        check_encoding(prefix + body + b"\xfe\xff\xdd\xe0\0\0\0\0", ts)


def test_undefined_length_sequences_nested_in_un_walked():
    """PS3.5 6.2.2: a UN element of undefined length holds an implicit VR sequence."""
    prefix, body, ts = _prefix_and_body("CT_small.dcm")
    item = b"\x08\x00\x50\x00" + (4).to_bytes(4, "little") + b"ACC1"  # (0008,0050) implicit, 4 bytes
    un = (
        b"\x09\x00\x10\x10UN\0\0\xff\xff\xff\xff"  # private (0009,1010) UN, undefined length
        + b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + item + b"\xfe\xff\x0d\xe0\0\0\0\0"
        + b"\xfe\xff\xdd\xe0\0\0\0\0"
    )
    at = body.index(b"\x10\x00\x10\x00PN")  # insert before (0010,0010): order is kept
    check_encoding(prefix + body[:at] + un + body[at:], ts)
    with pytest.raises(MalformedDataset, match="expected an Item or Sequence Delimitation Item"):
        check_encoding(prefix + body[:at] + un[:-8] + body[at:], ts)  # no Sequence Delimitation Item


def test_index_values_clip_to_the_vr_maximum():
    ds = pydicom.Dataset()
    ds.Modality, ds.PatientID, ds.SeriesDescription = "X" * 17, "P" * 64, "short"
    ds.AccessionNumber = ["A" * 10, "B" * 10]  # two values: 21 characters joined
    values, clipped = index_values(ds)
    assert values["Modality"] == "X" * 16 and values["PatientID"] == "P" * 64
    assert values["AccessionNumber"] == ("A" * 10 + "\\" + "B" * 5)
    assert clipped == {"Modality": 17, "AccessionNumber": 21}
    assert values["SeriesInstanceUID"] is None


def test_request_uids_must_match():
    data, ts = _file("CT_small.dcm")
    decision = check_instance(data, ts, sop_class_uid="1.2.840.10008.5.1.4.1.1.4", sop_instance_uid=None)
    assert isinstance(decision, Refused) and decision.status == Status.DATASET_MISMATCH
    assert "Affected SOP Class UID" in decision.reason
