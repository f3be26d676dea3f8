"""Check and repair one data element (PS3.5 6.2 VR, PS3.6 VM): text values
through :func:`pipelines.common.value_repair.sanitize_text`, sequences item
by item, binary numbers for finiteness and range; every change is a
:class:`Repair`. The dataset-level steps are in :mod:`pipelines.common.sanitize`.
"""

from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import validate_value

from pipelines.common.value_repair import MULTILINE_VRS, TEXT_VRS, sanitize_text

__all__ = ["TYPE2_IN_DERIVED", "Repair", "as_strings", "read_element", "sanitize_element", "vm_allows"]

#: Attributes that are Type 2 in every derived object we write (Patient,
#: General Study modules, PS3.3 C.7.1.1, C.7.2.1) and that highdicom reads
#: unconditionally from the source: an invalid value becomes empty, not absent.
TYPE2_IN_DERIVED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


@dataclass(frozen=True)
class Repair:
    """One change made to a value taken from a source image.

    Attributes
    ----------
    attribute:
        Keyword path, e.g. ``"PatientAge"`` or ``"OtherPatientIDsSequence[0].PatientID"``.
    original:
        The source's value as text (multiple values joined by ``\\``);
        ``None`` when the attribute was absent.
    replacement:
        The value written instead; ``""`` for an empty Type 2 value,
        ``None`` when the attribute was left out.
    reason:
        Why, citing the rule that the original value broke.
    """

    attribute: str
    original: str | None
    replacement: str | None
    reason: str

    def __str__(self) -> str:
        new = "left out" if self.replacement is None else repr(self.replacement)
        old = "absent" if self.original is None else repr(self.original)
        return f"{self.attribute}: {old} -> {new} ({self.reason})"


def read_element(dataset: Dataset, tag: int) -> DataElement:
    """``dataset[tag]``; where pydicom cannot convert the encoded value, an
    element holding the encoded text instead, for the checks to judge."""
    try:
        return dataset[tag]
    except (ValueError, TypeError, OverflowError, UnicodeError):
        raw = dataset.get_item(tag)
        vr = raw.VR or dictionary_VR(tag)
        value = raw.value
        text = (value.decode("latin-1") if isinstance(value, bytes) else str(value)).rstrip("\x00 ")
        parts = [text] if vr in MULTILINE_VRS else text.split("\\")
        # UC holds any text, several values, unconverted; then the real VR.
        element = DataElement(tag, "UC", parts if len(parts) > 1 else parts[0])
        element.VR = vr
        return element


def sanitize_element(element: DataElement, path: str, repairs: list[Repair]) -> DataElement | None:
    """A checked copy of ``element``, or ``None`` to leave it out."""
    keyword = element.keyword or path
    vr = element.VR
    if vr == "SQ":
        items = []
        for index, item in enumerate(element.value):
            clean = Dataset()
            for tag in list(item.keys()):
                sub_keyword = keyword_for_tag(tag)
                if tag.is_private or not sub_keyword:
                    continue
                fixed = sanitize_element(read_element(item, tag), f"{path}[{index}].{sub_keyword}", repairs)
                if fixed is not None:
                    clean.add(fixed)
            items.append(clean)
        return DataElement(element.tag, "SQ", DicomSequence(items))
    if vr not in TEXT_VRS:
        return _sanitize_binary(element, path, repairs)

    original = as_strings(element)
    values: list[str] = []
    reasons: list[str] = []
    for text in original:
        fixed_text, reason = sanitize_text(vr, keyword, text)
        if reason:
            reasons.append(reason)
        if fixed_text is not None:
            values.append(fixed_text)
        elif len(original) > 1:
            # One bad value of several: the rest would shift meaning, drop all.
            values = []
            reasons.append("one of its values is invalid")
            break
    if values and not vm_allows(element.tag, len(values)):
        reasons.append(f"Value Multiplicity {len(values)}, PS3.6 requires {dictionary_VM(element.tag)}")
        values = []

    if not reasons:
        return DataElement(element.tag, vr, _value_for(values))
    old = "\\".join(original)
    if values:
        new_text = "\\".join(values)
        repairs.append(Repair(path, old, new_text, "; ".join(reasons)))
        return DataElement(element.tag, vr, _value_for(values))
    if keyword in TYPE2_IN_DERIVED:
        repairs.append(Repair(path, old, "", "; ".join(reasons)))
        return DataElement(element.tag, vr, None)
    repairs.append(Repair(path, old, None, "; ".join(reasons)))
    return None


def _sanitize_binary(element: DataElement, path: str, repairs: list[Repair]) -> DataElement | None:
    value = element.value
    if element.VR in ("FL", "FD"):
        numbers = list(value) if isinstance(value, (list, MultiValue)) else ([] if value is None else [value])
        if any(not math.isfinite(float(v)) for v in numbers):
            repairs.append(Repair(path, "\\".join(map(str, numbers)), None, "not a finite number"))
            return None
    elif element.VR in ("US", "UL", "SS", "SL", "UV", "SV") and value is not None:
        numbers = list(value) if isinstance(value, (list, MultiValue)) else [value]
        for v in numbers:
            try:
                validate_value(element.VR, v, config.RAISE)
            except ValueError as exc:
                repairs.append(Repair(path, "\\".join(map(str, numbers)), None, str(exc)))
                return None
    keyword = element.keyword
    if keyword == "PregnancyStatus" and value not in (None, 1, 2, 3, 4):
        repairs.append(Repair(path, str(value), None, "enumerated values are 1, 2, 3, 4 (PS3.3 C.7.2.2)"))
        return None
    return deepcopy(element)


def as_strings(element: DataElement) -> list[str]:
    """The element's values as the text that was encoded."""
    value = element.value
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, (list, MultiValue)) else [value]
    texts = []
    for item in items:
        # DSfloat/IS keep the string they were read from: use it, not a
        # re-format (PersonName keeps encoded bytes there; str() decodes).
        original = getattr(item, "original_string", None)
        if isinstance(item, bytes):
            texts.append(item.decode("latin-1"))
        elif isinstance(original, str):
            texts.append(original)
        else:
            texts.append(str(item))
    return texts


def _value_for(values: list[str]) -> Any:
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def vm_allows(tag: int, count: int) -> bool:
    """Whether ``count`` values fit the Value Multiplicity of PS3.6."""
    if count == 0:
        return True
    try:
        low_text, _, high = dictionary_VM(tag).partition("-")
        low = int(low_text)
        if not high:
            return count == low
        if high == "n":
            return count >= low
        if high.endswith("n"):
            return count >= low and count % int(high[:-1]) == 0
        return low <= count <= int(high)
    except (KeyError, ValueError):
        # Not in the dictionary, or a VM spelled another way: nothing to check.
        return True
