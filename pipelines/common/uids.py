"""Deterministic UIDs of derived objects (PS3.5 9.1, B.1).

A re-run of a pipeline on the same sources with the same model gives the
same Series and SOP Instance UIDs (:func:`derived_uids`), so the PACS
replaces an earlier result instead of storing a duplicate; the model as a
device keeps one UID per name and version (:func:`device_uid`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid

from pipelines.common.identity import AlgorithmDescription, check_long_string

__all__ = ["DerivedUIDs", "derived_uid", "derived_uids", "device_uid"]

# Mixed into every UID's entropy so the node's UIDs never collide with those
# of another application hashing the same source UIDs under pydicom's root.
_UID_NAMESPACE = "dicom-ai-node"

@dataclass(frozen=True)
class DerivedUIDs:
    """Series Instance UID and SOP Instance UID of one derived object."""

    series_instance_uid: UID
    sop_instance_uid: UID


def derived_uid(prefix: str | None, *parts: str) -> UID:
    """A UID that is a function of ``parts`` only (PS3.5 9.1; under an
    organisation root, PS3.5 B.1).

    ``pydicom.uid.generate_uid(prefix, entropy_srcs=[...])`` hashes the parts
    (SHA-512) under ``prefix``; the same parts always give the same UID.

    Parameters
    ----------
    prefix:
        Organisation root ending in ``"."`` (``PipelineContext.uid_prefix``);
        ``None`` uses pydicom's root ``1.2.826.0.1.3680043.8.498.`` (pydicom's
        own ``prefix=None`` would ignore the entropy and return a random
        ``2.25.`` UUID UID, which would defeat the purpose).
    parts:
        Strings that identify what the UID names; at least one.

    Raises
    ------
    ValueError
        ``prefix`` is not a valid UID root (names ``uid_prefix``), or no
        part is given.
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part to derive from")
    # generate_uid concatenates its sources; a separator keeps ("ab", "c")
    # and ("a", "bc") apart.
    entropy = "\x1f".join((_UID_NAMESPACE, *parts))
    try:
        return generate_uid(PYDICOM_ROOT_UID if prefix is None else prefix, entropy_srcs=[entropy])
    except ValueError as exc:
        raise ValueError(f"uid_prefix {prefix!r} is not a valid UID root: {exc}") from None


def derived_uids(
    sources: Sequence[Dataset],
    *,
    pipeline: str,
    algorithm: AlgorithmDescription,
    kind: str,
    prefix: str | None,
) -> DerivedUIDs:
    """Deterministic UIDs of a derived object.

    The Series Instance UID derives from the sorted source Series Instance
    UIDs, the SOP Instance UID from the sorted source SOP Instance UIDs; both
    also from ``pipeline``, the model's name and version and ``kind``. A
    re-run gives the same UIDs (the PACS replaces the earlier object); another
    model version, another kind or other sources give other UIDs. Order of
    ``sources`` does not matter.

    Parameters
    ----------
    sources:
        The source images (datasets or sanitised copies).
    pipeline:
        Routing name of the pipeline, e.g. ``"pneumonia"``.
    algorithm:
        The model.
    kind:
        What the object is, e.g. ``"SEG"`` or ``"SR"``: a SEG and an SR of
        the same run are in different series (a series has one Modality).
    prefix:
        ``PipelineContext.uid_prefix``.

    Raises
    ------
    ValueError
        ``sources`` is empty, ``pipeline`` or ``kind`` is empty, a source
        lacks its UIDs, or ``prefix`` is invalid.
    """
    if not sources:
        raise ValueError("sources is empty: a derived object needs at least one source image")
    check_long_string(pipeline, "pipeline")
    check_long_string(kind, "kind")
    try:
        series = sorted({str(ds.SeriesInstanceUID) for ds in sources})
        instances = sorted({str(ds.SOPInstanceUID) for ds in sources})
    except AttributeError as exc:
        raise ValueError(f"a source image lacks its UIDs: {exc}") from None
    identity = (pipeline, algorithm.name, algorithm.version, kind)
    return DerivedUIDs(
        series_instance_uid=derived_uid(prefix, "series", *identity, *series),
        sop_instance_uid=derived_uid(prefix, "instance", *identity, *instances),
    )


def device_uid(algorithm: AlgorithmDescription, prefix: str | None) -> UID:
    """UID of the node running ``algorithm``, as a device (TID 1004 Device
    Observer UID in the SR; also written as the SEG's Device Serial Number, so
    both objects name the same device). Same model and version, same UID.

    Raises
    ------
    ValueError
        ``prefix`` is invalid.
    """
    return derived_uid(prefix, "device", algorithm.name, algorithm.version)
