"""Send DICOM files as a C-STORE SCU, like dcmtk's storescu (``ainode send``).

Each file is read and checked before it is sent; a file that cannot be read
or encoded is reported with the reason (pydicom's and pynetdicom's, which
pynetdicom itself only logs), and the caller goes on with the rest. Statuses
are classified by :mod:`node.outcome` (PS3.4 B.2.3).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from node.outcome import OutcomeClass, classify_dimse, dimse_status_text


def read_header(path: Path) -> tuple[pydicom.Dataset | None, str | None]:
    """(header without pixels, None), or (None, why ``path`` cannot be sent).

    pydicom's warnings are kept for :func:`store_file`, which reads the file
    again in full and reports them where the file fails.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many kinds on a damaged file
            return None, f"cannot read as DICOM: {type(exc).__name__}: {exc}"
    why = _unsendable(ds)
    return (None, why + "".join(f"; pydicom: {w.message}" for w in caught)) if why else (ds, None)


def _unsendable(ds) -> str | None:
    """Why a read data set cannot be C-STOREd, or None. pydicom returns an
    empty data set, not an error, for some truncated files."""
    missing = [name for k, name in (("SOPClassUID", "SOP Class UID"), ("SOPInstanceUID", "SOP Instance UID")) if k not in ds]
    if missing:
        return f"no {' or '.join(missing)} in the data set (empty or truncated file?)"
    if "TransferSyntaxUID" not in ds.file_meta:
        return "no Transfer Syntax UID (0002,0010) in the file meta information"
    return None


def _encode_error(ds, syntax) -> str:
    """pydicom's reason a data set does not encode in ``syntax`` (pynetdicom only logs it)."""
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = syntax.is_implicit_VR, syntax.is_little_endian
    try:
        write_dataset(fp, ds)
    except Exception as exc:  # pydicom appends a traceback to the message: keep its first line
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return "unknown"


def store_file(assoc, path: Path) -> tuple[bool, str]:
    """C-STORE one file on ``assoc``: (stored, what to print)."""
    # pydicom's warnings, while reading and while pynetdicom encodes ("found
    # implicit VR", "end of file reached"), name the cause of a failure.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok, text = _store(assoc, path)
    if not ok and caught:
        text += "".join(f"; pydicom: {w.message}" for w in caught)
    return ok, text


def _store(assoc, path: Path) -> tuple[bool, str]:
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        return False, f"failed: cannot read: {type(exc).__name__}: {exc}"
    if why := _unsendable(ds):  # the header read before the pixel data was fine
        return False, f"failed: {why}"
    try:
        status = assoc.send_c_store(ds)
    except ValueError as exc:  # pynetdicom: no accepted presentation context, or encoding failed
        why = f"{exc}: {_encode_error(ds, ds.file_meta.TransferSyntaxUID)}" if "encode" in str(exc) else str(exc)
        return False, f"failed: not sent: {why}"
    except (AttributeError, RuntimeError) as exc:  # unusable data set; association gone
        return False, f"failed: not sent: {exc}"
    if not status or "Status" not in status:
        return False, "failed: no C-STORE response (connection lost or timed out)"
    code = int(status.Status)
    outcome = classify_dimse(code)
    text = f"C-STORE status {dimse_status_text(code)}"
    if outcome != OutcomeClass.SUCCESS:
        comment = status.get("ErrorComment")
        return False, f"failed: {text}{' ' + str(comment) if comment else ''} ({outcome})"
    return True, text
