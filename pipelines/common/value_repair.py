"""Check and repair one text value per its VR (PS3.5 6.2) with pydicom's validators.

:func:`sanitize_text` is the per-value step of
:func:`pipelines.common.sanitize.sanitize_source`: it repairs a value where
one reading is certain (Patient's Age ``62`` -> ``062Y``, an ACR-NEMA date
``2020.01.31`` -> ``20200131``) and rejects it otherwise.
"""

from __future__ import annotations

import datetime
import functools
import math
import re

from pydicom import config
from pydicom.valuerep import MAX_VALUE_LEN, format_number_as_ds, validate_value

__all__ = ["MULTILINE_VRS", "PATIENT_ORIENTATION", "TEXT_VRS", "sanitize_text"]

# Enumerated values (PS3.3) of attributes in the copied modules; highdicom
# raises on an unknown Patient's Sex, a PACS may reject the others.
_ENUMERATED: dict[str, tuple[frozenset[str], dict[str, str]]] = {
    "PatientSex": (frozenset({"M", "F", "O"}), {"MALE": "M", "FEMALE": "F", "OTHER": "O"}),
    "PatientSexNeutered": (frozenset({"ALTERED", "UNALTERED"}), {}),
    "QualityControlSubject": (frozenset({"YES", "NO"}), {}),
    "PatientIdentityRemoved": (frozenset({"YES", "NO"}), {}),
    "SmokingStatus": (frozenset({"YES", "NO", "UNKNOWN"}), {}),
}

# PS3.5 6.2: control characters other than ESC are not allowed in these VRs;
# LT, ST and UT may also hold TAB, LF, FF and CR.
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")
_CONTROL_MULTILINE = re.compile(r"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")
MULTILINE_VRS = frozenset({"LT", "ST", "UT"})
TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
# VRs whose leading/trailing spaces carry no meaning (PS3.5 6.2).
_STRIPPED_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})

_DATE = re.compile(r"\d{8}")
_DATE_SEPARATED = re.compile(r"(\d{4})[.\-/](\d{2})[.\-/](\d{2})")
_TIME = re.compile(r"([01]\d|2[0-3])(?:([0-5]\d)(?:(60|[0-5]\d)(\.\d{1,6})?)?)?")
_TIME_COLONS = re.compile(r"([01]\d|2[0-3]):([0-5]\d)(?::(60|[0-5]\d)(\.\d{1,6})?)?")
_DATETIME = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:([01]\d|2[0-3])(?:([0-5]\d)(?:(60|[0-5]\d)(\.\d{1,6})?)?)?)?)?)?"
    r"([+-](?:[01]\d|2[0-3])[0-5]\d)?"
)
_AGE = re.compile(r"(\d{1,3})\s*([DWMYdwmy]?)")
PATIENT_ORIENTATION = re.compile(
    # PS3.3 C.7.6.1.1.1: biped A P R L H F, quadruped LE RT D V CR CD R M PA PL DI PR.
    r"(?:[APRLHF]|LE|RT|D|V|CR|CD|M|PA|PL|DI|PR)+"
)
_INT32 = (-(2**31), 2**31 - 1)


# Pure function of its arguments; a series repeats most values (codes, UIDs,
# spacings) hundreds of times, so a cache halves the checks of a 465-frame SEG.
@functools.lru_cache(maxsize=65536)
def sanitize_text(vr: str, keyword: str, text: str) -> tuple[str | None, str | None]:
    """Return ``(value, reason)``: the value to write (``None``: none) and why
    it differs from ``text`` (``None``: it does not)."""
    reasons: list[str] = []
    value = text
    control = _CONTROL_MULTILINE if vr in MULTILINE_VRS else _CONTROL
    if control.search(value):
        value = control.sub(" ", value)
        reasons.append(f"control characters are not allowed in {vr} (PS3.5 6.2)")
    if vr in _STRIPPED_VRS:
        value = value.strip(" \x00")
    elif vr != "PN":
        value = value.rstrip(" ")

    fixed, reason = _REPAIRS.get(vr, _keep)(value, keyword)
    if reason:
        reasons.append(reason)
    if fixed is not None and keyword in _ENUMERATED:
        allowed, synonyms = _ENUMERATED[keyword]
        upper = fixed.upper()
        if fixed and fixed not in allowed:
            if synonyms.get(upper) or upper in allowed:
                fixed = synonyms.get(upper, upper)
                reasons.append(f"enumerated values are {'/'.join(sorted(allowed))} (PS3.3)")
            else:
                reasons.append(f"not one of the enumerated values {'/'.join(sorted(allowed))} (PS3.3)")
                fixed = None
    if fixed is not None:
        try:
            validate_value(vr, fixed, config.RAISE)
        except ValueError as exc:
            reasons.append(str(exc).split(" Please see")[0])
            fixed = None
    # Padding is not content: "CHEST " and "CHEST" are the same value.
    unpadded = text.strip(" \x00") if vr in _STRIPPED_VRS else text if vr == "PN" else text.rstrip(" ")
    if fixed == unpadded and not reasons:
        return fixed, None
    return fixed, "; ".join(reasons) or "normalised"


def _keep(value: str, keyword: str) -> tuple[str | None, str | None]:
    return value, None


def _fix_age(value: str, keyword: str) -> tuple[str | None, str | None]:
    if not value:
        return value, None
    if re.fullmatch(r"\d{3}[DWMY]", value):
        return value, None
    match = _AGE.fullmatch(value)
    if match is None:
        return None, "not an Age String nnnD/W/M/Y (PS3.5 6.2)"
    number, unit = match.groups()
    # A bare number is an age in years: that is how every modality and RIS
    # that writes one means it (e.g. the RSNA/SIIM chest radiographs).
    return f"{int(number):03d}{(unit or 'Y').upper()}", "Age String is nnnD/W/M/Y (PS3.5 6.2); a bare number is years"


def _fix_cs(value: str, keyword: str) -> tuple[str | None, str | None]:
    if re.fullmatch(r"[A-Z0-9 _]*", value):
        return (value, None) if len(value) <= 16 else (None, "longer than 16 characters (CS, PS3.5 6.2)")
    upper = value.upper()
    if re.fullmatch(r"[A-Z0-9 _]*", upper) and len(upper) <= 16:
        return upper, "CS allows upper-case letters only (PS3.5 6.2)"
    return None, "characters outside A-Z 0-9 space _ (CS, PS3.5 6.2)"


def _valid_date(year: int, month: int, day: int) -> bool:
    try:
        datetime.date(year, month, day)
    except ValueError:
        return False
    return True


def _fix_da(value: str, keyword: str) -> tuple[str | None, str | None]:
    if not value:
        return value, None
    if _DATE.fullmatch(value):
        if _valid_date(int(value[:4]), int(value[4:6]), int(value[6:])):
            return value, None
        return None, "not a calendar date (DA, PS3.5 6.2)"
    match = _DATE_SEPARATED.fullmatch(value)
    if match and _valid_date(*(int(g) for g in match.groups())):
        return "".join(match.groups()), "DA is YYYYMMDD; the separated form is ACR-NEMA (PS3.5 6.2)"
    return None, "not a date YYYYMMDD (DA, PS3.5 6.2)"


def _fix_tm(value: str, keyword: str) -> tuple[str | None, str | None]:
    if not value or _TIME.fullmatch(value):
        return value, None
    match = _TIME_COLONS.fullmatch(value)
    if match:
        hh, mm, ss, frac = match.groups()
        return f"{hh}{mm}{ss or ''}{frac or ''}", "TM is HHMMSS.FFFFFF; the colon form is ACR-NEMA (PS3.5 6.2)"
    return None, "not a time HHMMSS.FFFFFF (TM, PS3.5 6.2)"


def _fix_dt(value: str, keyword: str) -> tuple[str | None, str | None]:
    if not value:
        return value, None
    match = _DATETIME.fullmatch(value)
    if match is None:
        return None, "not a date-time YYYYMMDDHHMMSS.FFFFFF&ZZXX (DT, PS3.5 6.2)"
    year, month, day = match.group(1), match.group(2), match.group(3)
    if month and not _valid_date(int(year), int(month), int(day or 1)):
        return None, "not a calendar date (DT, PS3.5 6.2)"
    return value, None


def _fix_ds(value: str, keyword: str) -> tuple[str | None, str | None]:
    if not value:
        return value, None
    try:
        number = float(value)
    except ValueError:
        return None, "not a decimal number (DS, PS3.5 6.2)"
    if not math.isfinite(number):
        return None, "not a finite number (DS, PS3.5 6.2)"
    try:
        validate_value("DS", value, config.RAISE)
    except ValueError:
        return format_number_as_ds(number), "DS is at most 16 characters of [0-9+-Ee.] (PS3.5 6.2)"
    return value, None


def _fix_is(value: str, keyword: str) -> tuple[str | None, str | None]:
    if not value:
        return value, None
    if re.fullmatch(r"[+\-]?\d{1,11}", value) and _INT32[0] <= int(value) <= _INT32[1]:
        return value, None
    try:
        number = float(value)
    except ValueError:
        return None, "not an integer (IS, PS3.5 6.2)"
    if math.isfinite(number) and number.is_integer() and _INT32[0] <= number <= _INT32[1]:
        return str(int(number)), "IS is a signed 32-bit integer without fraction (PS3.5 6.2)"
    return None, "not a 32-bit integer (IS, PS3.5 6.2)"


def _fix_pn(value: str, keyword: str) -> tuple[str | None, str | None]:
    groups = value.split("=")
    if len(groups) > 3 or any(group.count("^") > 4 for group in groups):
        return None, "more than 3 component groups or 5 components (PN, PS3.5 6.2.1)"
    if any(len(group) > 64 for group in groups):
        return None, "a component group is longer than 64 characters (PN, PS3.5 6.2)"
    return value, None


def _fix_text(limit: int, vr: str):
    def fix(value: str, keyword: str) -> tuple[str | None, str | None]:
        if len(value) <= limit:
            return value, None
        if keyword.endswith(("ID", "UID", "Number")):
            # A shortened identifier would name another patient or study.
            return None, f"identifier longer than {limit} characters ({vr}, PS3.5 6.2)"
        return value[:limit].rstrip(" "), f"cut to {limit} characters ({vr}, PS3.5 6.2)"

    return fix


def _fix_ae(value: str, keyword: str) -> tuple[str | None, str | None]:
    if len(value) <= 16 and re.fullmatch(r"[\x20-\x5b\x5d-\x7e]*", value):
        return value, None
    return None, "not an AE title (PS3.5 6.2)"


def _fix_ui(value: str, keyword: str) -> tuple[str | None, str | None]:
    try:
        validate_value("UI", value, config.RAISE)
    except ValueError:
        return None, "not a UID (UI, PS3.5 6.2; PS3.5 9.1)"
    return value, None


_REPAIRS = {
    "AS": _fix_age,
    "CS": _fix_cs,
    "DA": _fix_da,
    "TM": _fix_tm,
    "DT": _fix_dt,
    "DS": _fix_ds,
    "IS": _fix_is,
    "PN": _fix_pn,
    "AE": _fix_ae,
    "UI": _fix_ui,
    "LO": _fix_text(MAX_VALUE_LEN["LO"], "LO"),
    "SH": _fix_text(MAX_VALUE_LEN["SH"], "SH"),
    "ST": _fix_text(MAX_VALUE_LEN["ST"], "ST"),
    "LT": _fix_text(MAX_VALUE_LEN["LT"], "LT"),
}
