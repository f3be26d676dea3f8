"""Ingest: accept or refuse one received instance, in one place.

Every source (:class:`Source`: the C-STORE SCP, :mod:`node.receive`, and
STOW-RS, :mod:`node.api.routers.stow`) hands the encoded bytes to
:meth:`Ingest.store`: the one path of checks, refusal and quarantine,
duplicate check, free-disk guard, durable spool and index. Its decision on
the bytes is :func:`check_instance`, pure and without networking: it
returns :class:`Accepted` (the values the index keeps) or :class:`Refused`
(the DIMSE status and the reason).

What is refused, and with which status (PS3.4 B.2.3, PS3.7 C.4.2.1.4):

- bytes that do not parse under the negotiated transfer syntax: truncated or
  overrunning elements, a VR that is not a VR (an implicit VR body sent as
  explicit), native Pixel Data under an encapsulated syntax or the reverse
  (PS3.5 A.4): 0xC210 "Cannot understand";
- missing, malformed or wrongly encoded identifying attributes (a UID not
  encoded as UI, a Patient ID that is not text), or UIDs contradicting the
  request's Affected SOP Class/Instance UID: 0xA900 "Data Set does not match
  SOP Class".

Both are faults in the data: the caller quarantines the bytes. 0xA700 "Out
of resources" is never decided here; it is only for the node's own disk or
index.

Over-long values are not refused: the index keeps them clipped to their VR's
maximum length (PS3.5 6.2) and flags the instance; the file keeps them whole.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from io import BytesIO
from typing import Any

import structlog
from pydicom.datadict import dictionary_VR
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import MAX_VALUE_LEN

from node.index import InstanceRecord
from node.index.audit import AuditEvent, audit_quietly
from node.metrics import Metrics
from node.spool import INDEX_KEYWORDS, FreeSpace, Spool, is_safe_uid, read_header


class Status(IntEnum):
    """The C-STORE statuses the node answers (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # our disk or index only: the peer retries
    DATASET_MISMATCH = 0xA900  # Data Set does not match SOP Class
    CANNOT_UNDERSTAND = 0xC210

    @property
    def code(self) -> str:
        """As logged and quarantined: ``0xA900``."""
        return f"0x{self.value:04X}"


@dataclass(frozen=True)
class Accepted:
    """An instance to store and index.

    ``values`` maps each of :data:`node.spool.INDEX_KEYWORDS` to its value
    (None when absent); text is clipped to its VR's maximum length, and
    ``clipped`` names the clipped keywords with their original lengths
    (characters).
    """

    values: dict[str, Any]
    transfer_syntax_uid: str
    clipped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Refused:
    """An instance to refuse with ``status`` and quarantine with ``reason``."""

    status: Status
    reason: str


REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
#: Text attributes of the index, clipped to their VR's maximum length.
TEXT_KEYWORDS = ("Modality", "SeriesDescription", "PatientID", "AccessionNumber")
#: Indexed for the operator's views only: never a reason to refuse an instance.
DISPLAY_KEYWORDS = {"PatientName": 64, "StudyDate": 8}


def check_instance(
    encoded: bytes,
    transfer_syntax_uid: str,
    *,
    sop_class_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Accepted | Refused:
    """Decide on one received instance.

    Parameters
    ----------
    encoded:
        The DICOM file as received: 128-byte preamble, ``DICM``, file meta
        (explicit VR little endian), dataset in ``transfer_syntax_uid``, as
        pynetdicom's ``event.encoded_dataset(include_meta=True)`` gives it.
    transfer_syntax_uid:
        The negotiated transfer syntax (the presentation context's).
    sop_class_uid, sop_instance_uid:
        The request's Affected SOP Class/Instance UID (PS3.7 9.1.1), which
        the dataset must repeat; None skips that check.
    """
    try:
        pixel_data = check_encoding(encoded, transfer_syntax_uid)
        header = read_header(encoded, INDEX_KEYWORDS)
    except (MalformedDataset, RecursionError) as exc:
        return Refused(Status.CANNOT_UNDERSTAND, f"dataset cannot be parsed: {exc}")
    except Exception as exc:  # pydicom raises many kinds on bad values
        return Refused(Status.CANNOT_UNDERSTAND, f"dataset cannot be parsed: {exc!r}")

    wrong = [
        f"{kw} is encoded as {header[kw].VR}, not {dictionary_VR(kw)}"
        for kw in REQUIRED_UIDS + TEXT_KEYWORDS
        if kw in header and not _has_dictionary_type(kw, header[kw].VR, header[kw].value)
    ]
    if wrong:
        return Refused(Status.DATASET_MISMATCH, "; ".join(wrong) + " (PS3.6)")
    bad = [kw for kw in REQUIRED_UIDS if not is_safe_uid(header.get(kw))]
    if bad:
        return Refused(Status.DATASET_MISMATCH, f"missing or malformed {', '.join(bad)}")
    for kw, requested, name in (
        ("SOPInstanceUID", sop_instance_uid, "Affected SOP Instance UID"),
        ("SOPClassUID", sop_class_uid, "Affected SOP Class UID"),
    ):
        if requested is not None and header.get(kw) != requested:
            return Refused(
                Status.DATASET_MISMATCH, f"{kw} {header.get(kw)} differs from the request's {name} {requested}"
            )
    if pixel_data is None and header.SOPClassUID in _IMAGE_CLASSES and "JPIP" not in UID(transfer_syntax_uid).name:
        # Type 1 in the Image Pixel module (PS3.3 C.7.6.3) unless JPIP: often a
        # file cut at an element boundary, which the walk cannot see.
        return Refused(Status.DATASET_MISMATCH, f"no Pixel Data (7FE0,0010) in a {header.SOPClassUID.name} instance")
    values, clipped = index_values(header)
    return Accepted(values, str(transfer_syntax_uid), clipped)


def _image_storage_classes() -> frozenset[str]:
    from pydicom._uid_dict import UID_dictionary

    return frozenset(u for u, (name, kind, *_) in UID_dictionary.items() if kind == "SOP Class" and "Image Storage" in name)


#: Storage SOP Classes of images (PS3.6 names "... Image Storage"): their instances have Pixel Data.
_IMAGE_CLASSES = _image_storage_classes()


def _has_dictionary_type(keyword: str, vr: str, value: Any) -> bool:
    """A UID must be encoded as UI; a text attribute as any text VR (a
    sloppy SH for LO is harmless, a binary VR is not)."""
    if keyword in REQUIRED_UIDS:
        return vr == "UI"
    values = value if isinstance(value, MultiValue) else [value]
    return all(v is None or isinstance(v, str) for v in values)


def index_values(header) -> tuple[dict[str, Any], dict[str, int]]:
    """The index's values of a parsed header (``read_header``), text
    clipped to its VR's maximum length (PS3.5 6.2: CS 16, SH 16, LO 64
    characters; the index columns have these widths). Multiple values are
    joined with backslashes, as encoded. Returns (values, clipped keywords
    -> original length)."""
    values: dict[str, Any] = {}
    clipped: dict[str, int] = {}
    for kw in INDEX_KEYWORDS:
        value = header.get(kw)
        if kw in TEXT_KEYWORDS:
            text = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value or "")
            limit = MAX_VALUE_LEN[dictionary_VR(kw)]
            if len(text) > limit:
                clipped[kw] = len(text)
                text = text[:limit]
            value = text or None
        elif kw in DISPLAY_KEYWORDS:  # PN, DA: text as encoded, cut to the column
            text = str(value or "").strip()[: DISPLAY_KEYWORDS[kw]]
            value = text or None
        values[kw] = value
    return values, clipped


# -- the one path of every source -----------------------------------------------------


class Source(StrEnum):
    """Where an instance came from (``instances.source``,
    ``series.last_source``). The completion sweep waits
    ``[completion] series_idle_seconds`` (or the association's release)
    after C-STORE, ``stow_idle_seconds`` after STOW-RS, where the end of a
    request is no end of a series (many clients send one instance a request)."""

    C_STORE = "c-store"  # PS3.4 B.2, over a DICOM association
    STOW_RS = "stow-rs"  # PS3.18 10.5, over HTTP


@dataclass(frozen=True)
class Outcome:
    """What :meth:`Ingest.store` did with one instance.

    ``status``: 0x0000 stored (``new`` is False for a duplicate, stored
    once), else refused with ``reason``; the value is the C-STORE status
    (PS3.4 B.2.3) and the STOW-RS Failure Reason (0008,1197) alike (PS3.18
    10.5.3). The UIDs are what the bytes tell, None where they do not.
    """

    status: Status
    reason: str | None = None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    new: bool = False

    @property
    def stored(self) -> bool:
        return self.status == Status.SUCCESS


class Ingest:
    """Check, refuse and quarantine, or spool and index, one instance: the
    one path of every :class:`Source`.

    Parameters
    ----------
    spool, index:
        Where instances are written (durably) and recorded.
    free_space:
        The free-disk guard (``[storage] min_free_mb``, ``min_free_percent``).
    metrics:
        The node's :class:`node.metrics.Metrics`; None: a private one.
    """

    def __init__(self, spool: Spool, index, free_space: FreeSpace, *, metrics: Metrics | None = None):
        self.spool = spool
        self.index = index
        self.free_space = free_space
        self.metrics = metrics if metrics is not None else Metrics()
        self.log = structlog.get_logger("node.ingest")

    def store(
        self,
        encoded: bytes,
        transfer_syntax_uid: str | None,
        *,
        source: Source,
        peer: dict[str, Any],
        expected_sop_class: str | None = None,
        expected_sop_instance: str | None = None,
        expected_study: str | None = None,
    ) -> Outcome:
        """Store one instance, or refuse it; never raises.

        ``encoded`` is a DICOM file (preamble, file meta, dataset);
        ``transfer_syntax_uid`` the negotiated one (C-STORE), or None for
        the file meta's (0002,0010) (STOW-RS: each part is a PS3.10 file).
        ``peer`` names the sender for the log and the quarantine;
        ``calling_ae``, ``peer_address`` and ``association_id`` go to the
        index. ``expected_*`` are the request's Affected SOP Class/Instance
        UID (C-STORE) or the Study Instance UID of the request path
        (STOW-RS), which the dataset must repeat.

        Statuses (PS3.4 B.2.3; PS3.18 10.5.3 uses them as Failure Reasons):
        0x0000 once the file is durable and indexed, or was already (a
        duplicate); 0xA900 or 0xC210 for a fault in the data, quarantined;
        0xA700 only for our own faults: too little free disk (nothing
        written), the disk or the index failing. The sender retries those.
        """
        started = time.perf_counter()
        if not self.free_space.ok():
            return self._out_of_resources("instance_refused_disk_space", self.free_space.reason, peer)
        if transfer_syntax_uid is None:
            try:
                transfer_syntax_uid = file_transfer_syntax(encoded)
            except MalformedDataset as exc:
                reason = f"dataset cannot be parsed: {exc}"
                return self.refuse(encoded, Status.CANNOT_UNDERSTAND, reason, source=source, peer=peer)
        decision = check_instance(
            encoded, transfer_syntax_uid, sop_class_uid=expected_sop_class, sop_instance_uid=expected_sop_instance
        )
        if isinstance(decision, Refused):
            return self.refuse(encoded, decision.status, decision.reason, source=source, peer=peer)
        values = decision.values
        study_uid, series_uid, sop_uid = values["StudyInstanceUID"], values["SeriesInstanceUID"], values["SOPInstanceUID"]
        if expected_study is not None and study_uid != expected_study:
            reason = f"StudyInstanceUID {study_uid} differs from the request's Study Instance UID {expected_study}"
            return self.refuse(encoded, Status.DATASET_MISMATCH, reason, source=source, peer=peer)
        stored = Outcome(Status.SUCCESS, None, values["SOPClassUID"], sop_uid, study_uid)
        log = self.log.bind(
            study_uid=study_uid, series_uid=series_uid, sop_instance_uid=sop_uid, source=str(source),
            calling_ae=peer.get("calling_ae"), peer_address=peer.get("peer_address"),
        )
        if decision.clipped:  # indexed clipped (PS3.5 6.2 maxima); the file keeps them whole
            log.warning("instance_values_clipped", lengths=decision.clipped)
        try:
            if self.index.has_instance(sop_uid):
                log.info("instance_duplicate")
                self.metrics.instances_duplicate.inc()
                return stored
            path = self.spool.store_instance(study_uid, series_uid, sop_uid, encoded)
            record = InstanceRecord.from_values(
                values, decision.transfer_syntax_uid, path, len(encoded), clipped=bool(decision.clipped),
                calling_ae=peer.get("calling_ae"), peer_address=peer.get("peer_address"),
                association_id=peer.get("association_id"), source=str(source),
            )
            new = self.index.record_instance(record)
        except OSError as exc:
            return self._out_of_resources("instance_store_failed", str(exc), peer, log)
        except Exception as exc:  # the index is down: the sender must retry
            return self._out_of_resources("instance_index_failed", repr(exc), peer, log)
        (self.metrics.instances_received if new else self.metrics.instances_duplicate).inc()
        self.metrics.store_seconds.observe(time.perf_counter() - started)
        log.debug("instance_stored", bytes=len(encoded), new=new)
        return Outcome(Status.SUCCESS, None, stored.sop_class_uid, sop_uid, study_uid, new)

    def _out_of_resources(self, event: str, error: str | None, peer: dict, log=None) -> Outcome:
        (log or self.log).error(event, error=error, **({} if log else peer))
        self.metrics.instances_refused.labels(status=Status.OUT_OF_RESOURCES.code).inc()
        return Outcome(Status.OUT_OF_RESOURCES, error or event)

    def refuse(self, encoded: bytes, status: Status, reason: str, *, source: Source, peer: dict) -> Outcome:
        """Refuse a fault in the data (never 0xA700): quarantine the bytes
        with the reason, log and count it. For what a source finds wrong
        before the bytes reach :meth:`store` (a STOW-RS part cut short)."""
        details = {"dimse_status": status.code, "source": str(source), **peer}
        try:
            kept = self.spool.quarantine(encoded, reason, details)
        except OSError as exc:
            kept = None
            self.log.error("quarantine_failed", error=str(exc))
        self.log.warning(
            "instance_refused", status=status.code, reason=reason, quarantined=str(kept), source=str(source), **peer
        )
        self.metrics.instances_refused.labels(status=status.code).inc()
        outcome = Outcome(status, reason, *known_uids(encoded))
        who = {"actor": peer.get("calling_ae") or peer.get("token_name"), "client": peer.get("peer_address")}
        details |= {"reason": reason, "sop_instance_uid": outcome.sop_instance_uid, "quarantined": str(kept)}
        audit_quietly(self.index, AuditEvent.INSTANCE_QUARANTINED, study_uid=outcome.study_uid, details=details, **who)
        return outcome


def file_transfer_syntax(encoded: bytes) -> str:
    """The Transfer Syntax UID (0002,0010) of a DICOM file's meta
    information (PS3.10 7.1).

    Raises
    ------
    MalformedDataset
        No preamble and ``DICM``, a meta group that overruns the data, or
        no (0002,0010).
    """
    from pydicom.filereader import read_dataset

    if len(encoded) < 132 or encoded[128:132] != b"DICM":
        raise MalformedDataset("no DICOM preamble and 'DICM' prefix (PS3.10 7.1)")
    end = _Walker(encoded, explicit=True, little=True).meta_end(132)
    try:
        meta = read_dataset(BytesIO(encoded[132:end]), is_implicit_VR=False, is_little_endian=True)
        ts = meta.get("TransferSyntaxUID")
    except Exception as exc:  # pydicom raises many kinds on bad values
        raise MalformedDataset(f"the file meta information cannot be read: {exc!r}") from None
    if not ts:
        raise MalformedDataset("no Transfer Syntax UID (0002,0010) in the file meta information (PS3.10 7.1)")
    return str(ts).strip("\0 ")


def known_uids(encoded: bytes) -> tuple[str | None, str | None, str | None]:
    """(SOP Class, SOP Instance, Study Instance UID) as far as a refused
    instance's bytes tell them (pydicom, forgiving), each None if not."""
    import pydicom

    try:
        ds = pydicom.dcmread(
            BytesIO(encoded), force=True, stop_before_pixels=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"],
        )
        found = [ds.get(kw) for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")]
    except Exception:
        return None, None, None
    return tuple(str(v) if is_safe_uid(str(v)) else None for v in found)  # type: ignore[return-value]


# -- the element walk -----------------------------------------------------------------


class MalformedDataset(ValueError):
    """The encoded bytes do not parse under their transfer syntax; the
    message names the byte offset (in the inflated dataset for the deflated
    syntax) and the element."""


# PS3.5 7.1.2: these VRs have a reserved field and a 32-bit length.
_VR_LONG = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_VR_SHORT = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xE000, 0xE00D, 0xE0DD
#: A deflated dataset that inflates beyond this is refused (a deflate bomb).
MAX_INFLATED_BYTES = 1 << 31


def check_encoding(encoded: bytes, transfer_syntax_uid: str) -> str | None:
    """Walk every element of a DICOM file to its exact end, reading tags,
    VRs and lengths and seeking over values (cheap: a 10 MB image costs as
    much as its header).

    Undefined-length sequences and items are walked to their delimiters,
    encapsulated Pixel Data through its fragments (PS3.5 7.5, A.4). The
    deflated syntax is inflated first (PS3.5 A.5). Raises
    :class:`MalformedDataset` when an element overruns the end, bytes are
    left over, a delimiter is missing, an explicit VR is not a VR (PS3.5
    6.2), or the Pixel Data's form contradicts the transfer syntax: native
    (defined length) under an encapsulated syntax, or encapsulated under a
    native one (PS3.5 A.4). Returns the top-level Pixel Data's form:
    "native", "encapsulated", or None when there is none.
    """
    if not isinstance(encoded, bytes):
        encoded = bytes(encoded)
    ts = UID(transfer_syntax_uid)
    if not ts.is_transfer_syntax:
        raise MalformedDataset(f"{ts} is not a transfer syntax this node knows")
    if len(encoded) < 132 or encoded[128:132] != b"DICM":
        raise MalformedDataset("no DICOM preamble and 'DICM' prefix (PS3.10 7.1)")
    meta = _Walker(encoded, explicit=True, little=True)
    start = meta.meta_end(132)
    if ts.is_deflated:
        data: bytes | memoryview = _inflate(memoryview(encoded)[start:])
        start = 0
    else:
        data = encoded
    walker = _Walker(data, explicit=not ts.is_implicit_VR, little=ts.is_little_endian)
    walker.dataset(start, explicit=walker.explicit, in_item=False, top=True)
    if ts.is_encapsulated and walker.pixel_data == "native":
        raise MalformedDataset(
            f"Pixel Data (7FE0,0010) has a defined length (native) but {ts.name} is encapsulated: "
            "its Pixel Data must be of undefined length, in fragments (PS3.5 A.4)"
        )
    if not ts.is_encapsulated and walker.pixel_data == "encapsulated":
        raise MalformedDataset(f"Pixel Data (7FE0,0010) is encapsulated but {ts.name} is a native syntax (PS3.5 A.4)")
    return walker.pixel_data


def _inflate(body: memoryview) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, MAX_INFLATED_BYTES)
    except zlib.error as exc:
        raise MalformedDataset(f"the deflated dataset does not inflate: {exc}") from None
    if inflater.unconsumed_tail:
        raise MalformedDataset(f"the deflated dataset inflates beyond {MAX_INFLATED_BYTES} bytes")
    if not inflater.eof:
        raise MalformedDataset("the deflated dataset ends before its deflate stream does (truncated)")
    return out


class _Walker:
    """One pass over one encoding; ``pixel_data`` ends as None, "native" or
    "encapsulated" (the top-level (7FE0,0010))."""

    def __init__(self, data: bytes | memoryview, *, explicit: bool, little: bool):
        order = "<" if little else ">"
        self.data, self.end, self.explicit = data, len(data), explicit
        self._tag_len = struct.Struct(order + "HHI")
        self._len16 = struct.Struct(order + "H")
        self._len32 = struct.Struct(order + "I")
        self.pixel_data: str | None = None

    def _fail(self, pos: int, group: int, elem: int, what: str):
        raise MalformedDataset(f"at byte {pos}, ({group:04X},{elem:04X}): {what}")

    def header(self, pos: int, explicit: bool) -> tuple[int, int, bytes | None, int, int]:
        """(group, element, VR or None, length, value offset) at ``pos``."""
        if pos + 8 > self.end:
            raise MalformedDataset(f"at byte {pos}: {self.end - pos} bytes left, too few for an element header")
        group, elem, length = self._tag_len.unpack_from(self.data, pos)
        if group == 0xFFFE or not explicit:  # items and delimiters have no VR (PS3.5 7.5)
            return group, elem, None, length, pos + 8
        vr = bytes(self.data[pos + 4 : pos + 6])
        if vr in _VR_SHORT:
            return group, elem, vr, self._len16.unpack_from(self.data, pos + 6)[0], pos + 8
        if vr in _VR_LONG:
            if pos + 12 > self.end:
                self._fail(pos, group, elem, "the data ends inside the element header")
            return group, elem, vr, self._len32.unpack_from(self.data, pos + 8)[0], pos + 12
        self._fail(pos, group, elem, f"VR {vr!r} is not a DICOM VR (PS3.5 6.2): not explicit VR data?")
        raise AssertionError  # unreachable

    def meta_end(self, pos: int) -> int:
        """The offset after the file meta group (0002,xxxx)."""
        while pos + 2 <= self.end and self._len16.unpack_from(self.data, pos)[0] == 0x0002:
            group, elem, _, length, pos_v = self.header(pos, True)
            if length == _UNDEFINED or pos_v + length > self.end:
                self._fail(pos, group, elem, "file meta element overruns the data")
            pos = pos_v + length
        return pos

    def dataset(self, pos: int, *, explicit: bool, in_item: bool, top: bool) -> int:
        """Walk elements from ``pos``: to the end of the data, or, in an item
        of undefined length, through its Item Delimitation Item. Returns
        the offset after them."""
        data, end, tag_len, len16 = self.data, self.end, self._tag_len.unpack_from, self._len16.unpack_from
        while pos < end:
            # The common case inlined (a short-VR element): this loop is on the ingest hot path.
            if explicit and pos + 8 <= end and data[pos + 4 : pos + 6] in _VR_SHORT:
                group, elem, _ = tag_len(data, pos)
                pos_v = pos + 8
                pos = pos_v + len16(data, pos + 6)[0]
                if pos > end:
                    self._fail(pos_v - 8, group, elem, f"declares {pos - pos_v} bytes but {end - pos_v} remain")
                continue
            group, elem, vr, length, pos_v = self.header(pos, explicit)
            if group == 0xFFFE:
                if in_item and elem == _ITEM_END:
                    return pos_v
                self._fail(pos, group, elem, "an item tag where a data element was expected")
            if length != _UNDEFINED:
                if pos_v + length > self.end:
                    self._fail(pos, group, elem, f"declares {length} bytes but {self.end - pos_v} remain")
                native = True
                pos = pos_v + length
            elif vr is None or vr == b"SQ":  # implicit VR: undefined length is a sequence (or fragments)
                native = False
                pos = self.items(pos_v, explicit, fragments=False)
            elif vr == b"UN":  # PS3.5 6.2.2: an implicit VR sequence inside
                native = False
                pos = self.items(pos_v, False, fragments=False)
            elif (group, elem) == (0x7FE0, 0x0010) and vr in (b"OB", b"OW"):
                native = False
                pos = self.items(pos_v, explicit, fragments=True)
            else:
                self._fail(pos, group, elem, f"undefined length on VR {vr.decode('ascii')}")
            if top and (group, elem) == (0x7FE0, 0x0010):
                self.pixel_data = "native" if native else "encapsulated"
        if in_item:
            raise MalformedDataset(f"at byte {pos}: the data ends inside an item of undefined length")
        return pos

    def items(self, pos: int, explicit: bool, *, fragments: bool) -> int:
        """Walk the items of an undefined-length sequence (or the fragments
        of encapsulated Pixel Data) through its Sequence Delimitation Item."""
        while True:
            group, elem, _, length, pos_v = self.header(pos, False)
            if group == 0xFFFE and elem == _SEQUENCE_END:
                return pos_v
            if group != 0xFFFE or elem != _ITEM:
                self._fail(pos, group, elem, "expected an Item or Sequence Delimitation Item")
            if length == _UNDEFINED:
                if fragments:
                    self._fail(pos, group, elem, "a Pixel Data fragment of undefined length (PS3.5 A.4)")
                pos = self.dataset(pos_v, explicit=explicit, in_item=True, top=False)
            elif pos_v + length > self.end:
                self._fail(pos, group, elem, f"item declares {length} bytes but {self.end - pos_v} remain")
            else:
                pos = pos_v + length
