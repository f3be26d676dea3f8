"""Shared pieces of every derived object: model description, UIDs, labels,
sanitising of source values, image library.

Messy values are injected into a copy of a real radiograph's header
(``RG1_UNCR.dcm`` from pydicom-data), one VR at a time, the way they arrive
from real modalities and anonymisers.
"""

from __future__ import annotations

import copy

import highdicom as hd
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag

from pipelines.common.identity import (
    NOT_FOR_DIAGNOSTIC_USE,
    AlgorithmDescription,
    ensure_valid_values,
    fit_long_string,
    series_description,
)
from pipelines.common.sanitize import find_invalid_values, sanitize_source, sanitize_sources
from pipelines.common.seg_geometry import segmentation_source
from pipelines.common.sr_content import image_library
from pipelines.common.uids import derived_uid, derived_uids

ALGORITHM = AlgorithmDescription(name="pneumonia-densenet121-demo", version="1.0.0")


@pytest.fixture(scope="module")
def rg1_header() -> Dataset:
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)


@pytest.fixture
def header(rg1_header: Dataset) -> Dataset:
    return copy.deepcopy(rg1_header)


def arrive(dataset: Dataset, keyword: str, text: str) -> None:
    """Put ``text`` into ``dataset`` as it comes off the wire: encoded and not
    yet converted (pydicom would refuse to build some of these values)."""
    tag = Tag(tag_for_keyword(keyword))
    encoded = text.encode("latin-1")
    if len(encoded) % 2:
        encoded += b" "
    dataset[tag] = RawDataElement(tag, dictionary_VR(tag), len(encoded), encoded, 0, False, True)


def repairs_by_attribute(source: Dataset) -> tuple[Dataset, dict[str, object]]:
    proxy, repairs = sanitize_source(source)
    return proxy, {repair.attribute: repair for repair in repairs}


# -- AlgorithmDescription -------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "attribute"),
    [
        ({"name": "", "version": "1"}, "AlgorithmDescription.name"),
        ({"name": "m", "version": "1" * 65}, "AlgorithmDescription.version"),
        ({"name": "a\\b", "version": "1"}, "AlgorithmDescription.name"),
        ({"name": "m", "version": "1", "source": "caf\u00e9"}, "AlgorithmDescription.source"),
        ({"name": "m", "version": "1", "parameters": {"t": "0.5,0.6"}}, "AlgorithmDescription.parameters"),
    ],
)
def test_algorithm_description_refuses_values_naming_the_attribute(kwargs: dict, attribute: str) -> None:
    with pytest.raises(ValueError, match=attribute.replace(".", r"\.")):
        AlgorithmDescription(**kwargs)


def test_algorithm_description_family_must_be_a_code() -> None:
    with pytest.raises(TypeError, match="family"):
        AlgorithmDescription(name="m", version="1", family="AI")  # type: ignore[arg-type]


def test_algorithm_description_fills_both_identifications() -> None:
    algorithm = AlgorithmDescription(
        name="m", version="2.1", source="torchxrayvision", parameters={"cam_threshold": "0.5"}
    )
    item = algorithm.segmentation_identification()[0]
    assert (item.AlgorithmName, item.AlgorithmVersion, item.AlgorithmSource) == ("m", "2.1", "torchxrayvision")
    assert item.AlgorithmParameters == "cam_threshold=0.5"
    assert item.AlgorithmFamilyCodeSequence[0].CodeValue == codes.cid7162.ArtificialIntelligence.value
    texts = {item.name.meaning: item.value for item in algorithm.sr_identification() if item.ValueType == "TEXT"}
    assert texts == {"Algorithm Name": "m", "Algorithm Version": "2.1", "Algorithm Parameters": "cam_threshold=0.5"}
    with pytest.raises(TypeError):
        algorithm.parameters["x"] = "1"  # type: ignore[index]


# -- UIDs -----------------------------------------------------------------------


def test_derived_uids_depend_on_sources_model_version_and_kind(header: Dataset) -> None:
    other = copy.deepcopy(header)
    other.SOPInstanceUID = derived_uid(None, "another instance of the series")

    def uids(sources, algorithm=ALGORITHM, kind="SEG", prefix=None):
        return derived_uids(sources, pipeline="pneumonia", algorithm=algorithm, kind=kind, prefix=prefix)

    base = uids([header, other])
    assert base == uids([other, header])  # order of sources does not matter
    assert base.series_instance_uid == uids([header]).series_instance_uid  # same source series
    assert base.sop_instance_uid != uids([header]).sop_instance_uid
    assert uids([header], kind="SR").series_instance_uid != uids([header]).series_instance_uid
    newer = AlgorithmDescription(name=ALGORITHM.name, version="1.0.1")
    assert uids([header], algorithm=newer).sop_instance_uid != uids([header]).sop_instance_uid
    assert str(base.sop_instance_uid).startswith(pydicom.uid.PYDICOM_ROOT_UID)
    assert str(uids([header], prefix="1.2.3.").sop_instance_uid).startswith("1.2.3.")
    assert base.sop_instance_uid.is_valid and len(base.sop_instance_uid) <= 64


def test_derived_uid_parts_are_separated_and_prefix_checked() -> None:
    assert derived_uid(None, "ab", "c") != derived_uid(None, "a", "bc")
    assert derived_uid(None, "x") == derived_uid(None, "x")
    with pytest.raises(ValueError, match="uid_prefix"):
        derived_uid("1.2.03.", "x")
    with pytest.raises(ValueError, match="at least one part"):
        derived_uid(None)


# -- labels -----------------------------------------------------------------------


def test_series_description_keeps_version_and_warning_within_lo() -> None:
    short = AlgorithmDescription(name="cxr", version="3")
    assert series_description("pneumonia", short, "SEG") == f"pneumonia SEG cxr 3 - {NOT_FOR_DIAGNOSTIC_USE}"
    long_name = AlgorithmDescription(name="x" * 60, version="2024.06.1-rc2")
    text = series_description("pneumonia", long_name, "SR")
    assert len(text) <= 64 and "2024.06.1-rc2" in text and NOT_FOR_DIAGNOSTIC_USE in text
    with pytest.raises(ValueError, match="SeriesDescription"):
        series_description("pneumonia", AlgorithmDescription(name="m", version="v" * 50), "SEG")


def test_fit_long_string_refuses_characters_lo_does_not_allow() -> None:
    with pytest.raises(ValueError, match="ContentDescription"):
        fit_long_string(["a\nb"], "ContentDescription")


# -- sanitising ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        ("PatientAge", "62", "062Y"),
        ("PatientAge", "5 y", "005Y"),
        ("PatientAge", "045m", "045M"),
        ("PatientAge", "forty", None),
        ("PatientBirthDate", "1940-03-05", "19400305"),
        ("PatientBirthDate", "19401305", ""),  # no 13th month; Type 2: empty
        ("StudyTime", "18:50:59", "185059"),
        ("StudyTime", "25", ""),
        ("PatientSex", "female", "F"),
        ("PatientSex", "X", ""),
        ("PatientWeight", "72.50000000000000001", "72.5"),
        ("PatientWeight", "NaN", None),
        ("PatientSize", "tall", None),
        ("StudyDescription", "THORAX\x01PA", "THORAX PA"),
        ("StudyDescription", "T" * 70, "T" * 64),
        ("AccessionNumber", "A" * 20, ""),  # an identifier is not cut short
        ("StationName", "S" * 17, "S" * 16),
        ("SpecificCharacterSet", "ISO_IR 999", "ISO_IR 192"),  # unknown: UTF-8 encodes what was decoded
    ],
)
def test_invalid_values_are_repaired_or_dropped(
    header: Dataset, keyword: str, value: str, expected: str | None
) -> None:
    arrive(header, keyword, value)
    proxy, repaired = repairs_by_attribute(header)
    repair = repaired[keyword]
    assert repair.original == value
    assert repair.replacement == expected
    assert repair.reason
    if expected is None:
        assert keyword not in proxy
    else:
        assert str(proxy[keyword].value or "") == expected
    assert find_invalid_values(proxy) == []


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("StudyDate", "19010101"),  # a placeholder, but a valid date
        ("PatientName", "16d7f894-55d7-4d95-8957-d18987f0e981"),  # a bare UUID is a valid PN
        ("StudyID", ""),
        ("AccessionNumber", ""),
        ("PatientAge", "062Y"),
        ("StudyDescription", "THORAX  "),  # trailing padding is not content
        ("PatientSize", "1.75 "),
    ],
)
def test_valid_values_pass_untouched(header: Dataset, keyword: str, value: str) -> None:
    arrive(header, keyword, value)
    proxy, repaired = repairs_by_attribute(header)
    assert keyword not in repaired
    assert str(proxy[keyword].value or "") == value.rstrip(" ")


def test_geometry_must_be_physical(header: Dataset) -> None:
    arrive(header, "ImagerPixelSpacing", "-0.1\\0.1")
    arrive(header, "PatientOrientation", "X\\Y")
    arrive(header, "SliceThickness", "0")
    proxy, repaired = repairs_by_attribute(header)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "PatientOrientation", "SliceThickness"):
        assert repaired[keyword].replacement is None
        assert keyword not in proxy


def test_nested_sequences_are_checked_with_their_path(header: Dataset) -> None:
    item = Dataset()
    item.PatientID = "9RG1-OTHER"
    item.IssuerOfPatientID = "HOSPITAL\x07"
    header.OtherPatientIDsSequence = [item]
    proxy, repaired = repairs_by_attribute(header)
    repair = repaired["OtherPatientIDsSequence[0].IssuerOfPatientID"]
    assert repair.replacement == "HOSPITAL"
    assert proxy.OtherPatientIDsSequence[0].PatientID == "9RG1-OTHER"


def test_missing_type2_attributes_are_written_empty_and_reported(header: Dataset) -> None:
    del header.PatientID
    del header.StudyID
    proxy, repaired = repairs_by_attribute(header)
    for keyword in ("PatientID", "StudyID"):
        assert keyword in proxy and not proxy[keyword].value
        assert repaired[keyword].original is None and repaired[keyword].replacement == ""


def test_reference_uids_cannot_be_repaired(header: Dataset) -> None:
    header.StudyInstanceUID = "1.2.03.4"
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        sanitize_source(header)
    header.StudyInstanceUID = "1.2.3.4"
    header.SOPClassUID = "1.2.3.4.5"
    with pytest.raises(ValueError, match="SOPClassUID"):
        sanitize_source(header)


def test_proxy_holds_metadata_only_and_source_is_untouched(rg1_header: Dataset) -> None:
    source = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    before = copy.deepcopy(source)
    proxy, _ = sanitize_source(source)
    assert "PixelData" not in proxy
    assert "CollimatorShape" not in proxy  # neither Patient/Study nor equipment nor geometry
    assert proxy.StudyInstanceUID == source.StudyInstanceUID
    assert proxy.SOPInstanceUID == source.SOPInstanceUID
    assert source == before


def test_sanitize_sources_reports_each_repair_once(header: Dataset) -> None:
    header.PatientAge = "62"
    second = copy.deepcopy(header)
    second.SOPInstanceUID = derived_uid(None, "second slice")
    proxies, repairs = sanitize_sources([header, second])
    assert len(proxies) == 2
    assert [str(r) for r in repairs].count(str(next(r for r in repairs if r.attribute == "PatientAge"))) == 1
    with pytest.raises(ValueError, match="sources is empty"):
        sanitize_sources([])


def test_find_invalid_values_sees_what_dciodvfy_sees(header: Dataset) -> None:
    header.PatientAge = "62"
    assert any(problem.startswith("PatientAge") for problem in find_invalid_values(header))
    with pytest.raises(ValueError, match="SEG would carry invalid values: PatientAge"):
        ensure_valid_values(header, "SEG")


# -- geometry and image library ------------------------------------------------------


def test_segmentation_source_drops_spacing_without_frame_of_reference(header: Dataset) -> None:
    header.PixelSpacing = ["0.168", "0.168"]
    proxy, _ = sanitize_source(header)
    assert "PixelSpacing" in proxy
    assert "PixelSpacing" not in segmentation_source(proxy)
    proxy.FrameOfReferenceUID = derived_uid(None, "frame of reference")
    assert segmentation_source(proxy) is proxy


def test_image_library_describes_only_valid_geometry(header: Dataset) -> None:
    header.ImagerPixelSpacing = ["0.15", "0.16"]
    proxy, _ = sanitize_source(header)
    library = image_library([proxy])
    group = library.ContentSequence[0]
    modality = group.ContentSequence[0]
    assert modality.ConceptCodeSequence[0].CodeValue == "CR"
    image = group.ContentSequence[1]
    assert isinstance(image, hd.sr.ImageContentItem)
    assert image.referenced_sop_instance_uid == header.SOPInstanceUID
    descriptors = {item.name.meaning: item.value for item in image.ContentSequence}
    assert descriptors["Pixel Data Rows"] == header.Rows
    assert descriptors["Patient Orientation Row"] == "L"
    assert descriptors["Horizontal Pixel Spacing"] == pytest.approx(0.16)
    del proxy.PatientOrientation
    del proxy.ImagerPixelSpacing
    names = {item.name.meaning for item in image_library([proxy]).ContentSequence[0].ContentSequence[1].ContentSequence}
    assert names == {"Pixel Data Rows", "Pixel Data Columns"}
