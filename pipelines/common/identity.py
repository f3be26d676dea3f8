"""How a derived object names the model and itself.

Every SEG and SR the node writes names the model that made it
(:class:`AlgorithmDescription`) and says, in its Series Description
(:func:`series_description`), which pipeline, model and version made it and
that it is "NOT FOR DIAGNOSTIC USE", within the 64 characters of LO
(:func:`check_long_string`, :func:`fit_long_string`).
:func:`ensure_valid_values` is the writers' last check of a finished object.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipelines.common.sanitize import find_invalid_values

__all__ = [
    "NOT_FOR_DIAGNOSTIC_USE",
    "OUT_OF_INTENDED_USE",
    "AlgorithmDescription",
    "check_long_string",
    "ensure_valid_values",
    "fit_long_string",
    "series_description",
]

#: Said by the Series Description of every derived object (and by the SEG's
#: Content Description): the node's results support review, not diagnosis.
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"

#: Said by the Series Description of a derived object made from an input
#: outside the model card's intended use, processed with a warning
#: (:mod:`node.guard`), and by each warning in the SR.
OUT_OF_INTENDED_USE = "OUT OF INTENDED USE"

# LO (PS3.5 6.2): 64 characters of the default repertoire, no backslash, no
# control characters. Our own strings are kept to printable ASCII so that
# they encode under any Specific Character Set a source may declare.
_LO_CHARACTERS = re.compile(r"[\x20-\x5b\x5d-\x7e]*")
_LO_MAX = 64

def check_long_string(value: object, attribute: str, *, required: bool = True) -> str:
    """Check that ``value`` can be written as an LO value of our own.

    Raises
    ------
    ValueError
        Not a string, empty (when ``required``), longer than 64 characters, or
        holding a backslash or a character outside printable ASCII. The
        message names ``attribute``.
    """
    if not isinstance(value, str):
        raise ValueError(f"{attribute} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{attribute} is empty")
    if len(value) > _LO_MAX:
        raise ValueError(f"{attribute} is {len(value)} characters; LO allows {_LO_MAX} (PS3.5 6.2)")
    if not _LO_CHARACTERS.fullmatch(value):
        raise ValueError(f"{attribute} {value!r} must be printable ASCII without backslash (LO, PS3.5 6.2)")
    return value


@dataclass(frozen=True)
class AlgorithmDescription:
    """The model that produced a derived object, as the objects name it.

    It fills the SEG's Segmentation Algorithm Identification Sequence
    (PS3.3 C.8.20.2, Algorithm Identification Macro 10.16), the SR's TID 4019
    Algorithm Identification and TID 1004 Device Observer, and the Series
    Description of both.

    Attributes
    ----------
    name:
        Algorithm Name (0066,0036), LO: the model card's name, e.g.
        ``"pneumonia-densenet121-demo"``.
    version:
        Algorithm Version (0066,0031), LO, e.g. ``"1.0.0"``.
    source:
        Algorithm Source (0066,0032), LO, optional: where the model comes
        from, e.g. ``"torchxrayvision densenet121-res224-rsna"``.
    family:
        Algorithm Family Code (0066,002F) from CID 7162; default
        ``codes.cid7162.ArtificialIntelligence`` (DCM 123110).
    parameters:
        Algorithm Parameters (0066,0032 LT as ``name=value,...``; one TID 4019
        row each): name -> value of the settings the model ran with, e.g.
        ``{"cam_threshold": "0.5"}``.

    Raises
    ------
    ValueError
        On construction, naming the attribute: an empty or over-long string,
        a character LO does not allow, a parameter name holding ``=`` or
        ``,`` or a value holding ``,``.
    TypeError
        ``family`` is not a :class:`pydicom.sr.coding.Code` or
        :class:`highdicom.sr.CodedConcept`.
    """

    name: str
    version: str
    source: str | None = None
    family: Code | CodedConcept = codes.cid7162.ArtificialIntelligence
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_long_string(self.name, "AlgorithmDescription.name")
        check_long_string(self.version, "AlgorithmDescription.version")
        if self.source is not None:
            check_long_string(self.source, "AlgorithmDescription.source")
        if not isinstance(self.family, (Code, CodedConcept)):
            raise TypeError(
                f"AlgorithmDescription.family must be a Code from CID 7162, got {type(self.family).__name__}"
            )
        parameters = dict(self.parameters)
        for key, value in parameters.items():
            attribute = f"AlgorithmDescription.parameters[{key!r}]"
            check_long_string(key, attribute)
            check_long_string(value, attribute)
            # Written as "name=value,name=value" (highdicom, 0066,0032).
            if "=" in key or "," in key or "," in value:
                raise ValueError(f"{attribute} must not hold ',' (nor '=' in the name)")
        object.__setattr__(self, "parameters", MappingProxyType(parameters))

    @property
    def label(self) -> str:
        """``"<name> <version>"``, as written where a single text names the model;
        also each pipeline's ``model_version`` (``pipelines.base.Pipeline``)."""
        return f"{self.name} {self.version}"

    def segmentation_identification(self) -> hd.AlgorithmIdentificationSequence:
        """Algorithm Identification Sequence for a SEG segment (PS3.3 10.16)."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            family=self.family,
            version=self.version,
            source=self.source,
            parameters=dict(self.parameters) or None,
        )

    def sr_identification(self) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification for an SR measurement group."""
        return hd.sr.AlgorithmIdentification(
            name=self.name,
            version=self.version,
            parameters=[f"{key}={value}" for key, value in self.parameters.items()] or None,
            family=self.family,
        )

def fit_long_string(candidates: Sequence[str], attribute: str, *, limit: int = _LO_MAX) -> str:
    """The first of ``candidates`` (most to least complete) that fits LO.

    Raises
    ------
    ValueError
        None fits in ``limit`` characters, or one holds a character LO does
        not allow; the message names ``attribute``.
    """
    if not candidates:
        raise ValueError(f"{attribute}: no text to write")
    for text in candidates:
        check_long_string(text[:limit], attribute)
        if len(text) <= limit:
            return text
    raise ValueError(
        f"{attribute}: even the shortest form {candidates[-1]!r} is {len(candidates[-1])} characters, "
        f"LO allows {limit} (PS3.5 6.2); shorten the model's name or version"
    )


def series_description(
    pipeline: str, algorithm: AlgorithmDescription, kind: str, *, out_of_intended_use: bool = False
) -> str:
    """Series Description (0008,103E) of a derived series.

    Names the pipeline, the object kind, the model's name and version, and
    says "NOT FOR DIAGNOSTIC USE" (with ``out_of_intended_use``, first "OUT
    OF INTENDED USE"), shortened (model name first, then pipeline) to fit
    the 64 characters of LO; the version and the warnings always stay. The
    full name and version also go where the IOD has room.

    Raises
    ------
    ValueError
        Even ``"<kind> <version> [OUT OF INTENDED USE ]NOT FOR DIAGNOSTIC
        USE"`` is over 64 characters.
    """
    check_long_string(pipeline, "pipeline")
    check_long_string(kind, "kind")
    name, version = algorithm.name, algorithm.version
    # Every form carries the markers, so shortening never drops them.
    marker = f"{OUT_OF_INTENDED_USE} {NOT_FOR_DIAGNOSTIC_USE}" if out_of_intended_use else NOT_FOR_DIAGNOSTIC_USE
    return fit_long_string(
        [
            f"{pipeline} {kind} {name} {version} - {marker}",
            f"{name} {version} {kind} - {marker}",
            f"{pipeline} {kind} {version} - {marker}",
            f"{kind} {version} {marker}",
        ],
        "SeriesDescription",
    )

def ensure_valid_values(dataset: Dataset, what: str) -> None:
    """Last guard before a derived object leaves the writer.

    Raises
    ------
    ValueError
        A value of ``dataset`` breaks its VR or VM (see
        :func:`pipelines.common.sanitize.find_invalid_values`); the message
        starts with ``what`` and lists them.
    """
    problems = find_invalid_values(dataset)
    if problems:
        raise ValueError(f"{what} would carry invalid values: " + "; ".join(problems))
