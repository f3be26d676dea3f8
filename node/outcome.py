"""Outcomes of C-STORE, C-ECHO, STOW-RS, A-ASSOCIATE and file writes: success, transient, permanent.

The one place that decides whether a failure is worth another try. Dispatch
retries a transient failure with backoff and fails a permanent one at once;
``ainode send`` and ``ainode echo`` print the same words.

- DIMSE statuses: PS3.7 Annex C (general) and PS3.4 B.2.3 (Storage), with
  pynetdicom's categories (:func:`pynetdicom.status.code_to_category`).
- HTTP statuses: RFC 9110 section 15, as PS3.18 10.5.3 uses them for STOW-RS.
- File system errors (``folder`` destinations): POSIX errno values.
- Associations: PS3.8 7.1.1.9 (A-ASSOCIATE-RJ Result) and 9.3.4; the TCP
  failures pynetdicom hides (it logs them and reports an abort) are found
  again by :class:`AssociationWatch`.
"""

from __future__ import annotations

import errno
import socket
import ssl
import time
from dataclasses import dataclass
from enum import StrEnum

from pynetdicom import evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.status import (
    STATUS_FAILURE,
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)


class OutcomeClass(StrEnum):
    """What a response means for the sender."""

    SUCCESS = "success"  # stored (warnings included: the peer kept the instance)
    TRANSIENT = "transient"  # another try, later, may succeed
    PERMANENT = "permanent"  # no retry can succeed without a change at either end


@dataclass(frozen=True)
class Outcome:
    """What sending one file (or one C-ECHO or other check) came to.

    ``category`` says whether to try again; ``status`` is what the peer
    answered, as recorded in ``delivery_attempts`` ("0x0000" DIMSE, "200"
    HTTP, "ENOSPC" for a file system error), None where nothing was
    answered; ``text`` says what happened, in words, for a success as for a
    failure.
    """

    category: OutcomeClass
    status: str | None = None
    text: str | None = None

    @property
    def ok(self) -> bool:
        return self.category == OutcomeClass.SUCCESS

    @property
    def permanent(self) -> bool:
        """No retry can succeed: the delivery fails at its first attempt."""
        return self.category == OutcomeClass.PERMANENT

    @property
    def error(self) -> str | None:
        """``text`` of a failure; None for a success."""
        return None if self.ok else self.text


#: Failure statuses that another try may cure: the peer's own resources or
#: state, not our data (PS3.7 C.5.5 Processing Failure, C.5.6 Duplicate
#: Invocation, C.5.9 Resource Limitation). 0xA7xx (Out of Resources) too.
_TRANSIENT_FAILURES = frozenset({0x0110, 0x0210, 0x0213})

#: HTTP statuses in 4xx that another try may cure (RFC 9110 15.5.9 Request
#: Timeout; RFC 8470 Too Early; RFC 6585 Too Many Requests).
_TRANSIENT_HTTP_4XX = frozenset({408, 425, 429})

#: HTTP statuses in 5xx that no retry cures (Not Implemented, HTTP Version Not Supported).
_PERMANENT_HTTP_5XX = frozenset({501, 505})


def classify_dimse(code: int) -> OutcomeClass:
    """Classify a C-STORE or C-ECHO response Status (0x0000-0xFFFF).

    Success and Warning (0xB000, 0xB006, 0xB007, 0x0001, 0x0107, 0x0116) are
    success: the peer kept the instance (PS3.4 B.2.3). A Failure is
    permanent (0xA9xx Data Set Does Not Match SOP Class, 0xCxxx Cannot
    Understand, 0x0122 SOP Class Not Supported, 0x0117 Invalid Object
    Instance, 0x0124 Not Authorised, ...) except 0xA7xx Out of Resources,
    0x0110, 0x0210 and 0x0213, which are transient. Cancel, Pending (never a
    final C-STORE status) and codes pynetdicom does not know are transient:
    the retries are bounded, and a later try may be answered differently.

    Raises
    ------
    ValueError
        ``code`` is negative or not an int (from pynetdicom).
    """
    category = code_to_category(code)
    if category in (STATUS_SUCCESS, STATUS_WARNING):
        return OutcomeClass.SUCCESS
    if category == STATUS_FAILURE:
        if 0xA700 <= code <= 0xA7FF or code in _TRANSIENT_FAILURES:
            return OutcomeClass.TRANSIENT
        return OutcomeClass.PERMANENT
    return OutcomeClass.TRANSIENT


def dimse_status_text(code: int) -> str:
    """``0xA900 (Failure: Data Set Does Not Match SOP Class)``, from pynetdicom's
    Storage Service Class table (PS3.4 B.2.3 and PS3.7 Annex C)."""
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, (code_to_category(code), ""))
    return f"0x{code:04X} ({category}{': ' + meaning if meaning else ''})"


def classify_http(code: int) -> OutcomeClass:
    """Classify an HTTP response status (100-599) to a STOW-RS request.

    2xx is success (a 202's per-instance failures are classified with
    :func:`classify_dimse` on their Failure Reason, PS3.18 10.5.3). 408, 425,
    429 and 5xx other than 501 and 505 are transient; every other 4xx (bad
    request, authentication, not found, conflict, payload too large,
    unsupported media type), 501, 505 and 3xx (a redirect to follow by
    hand: the URL is wrong) are permanent. 1xx is transient.

    Raises
    ------
    ValueError
        ``code`` is not in 100-599.
    """
    if not 100 <= code <= 599:
        raise ValueError(f"HTTP status must be in 100-599, got {code}")
    if 200 <= code < 300:
        return OutcomeClass.SUCCESS
    if 400 <= code < 500:
        return OutcomeClass.TRANSIENT if code in _TRANSIENT_HTTP_4XX else OutcomeClass.PERMANENT
    if 500 <= code < 600:
        return OutcomeClass.PERMANENT if code in _PERMANENT_HTTP_5XX else OutcomeClass.TRANSIENT
    return OutcomeClass.PERMANENT if 300 <= code < 400 else OutcomeClass.TRANSIENT


#: errno values of a failed file write that no retry cures: the folder's
#: permissions or mount must change first (EACCES, EPERM, EROFS), or the path
#: or file cannot be there at all (ENOTDIR, EISDIR, ENAMETOOLONG, ELOOP, EFBIG,
#: EINVAL).
_PERMANENT_ERRNO = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP,
     errno.EFBIG, errno.EINVAL}
)


def classify_os_error(exc: OSError) -> OutcomeClass:
    """Classify a failed write to a file system (a ``folder`` destination).

    ENOSPC and EDQUOT (space or quota can be freed: retention, an operator)
    are transient, as are EIO, ESTALE, ENOTCONN, ETIMEDOUT (a network share
    or a drive that may come back) and any errno not named here: the retries
    are bounded. EACCES, EPERM and EROFS are permanent: another try is
    refused the same way until someone changes the permissions or the mount
    (then ``ainode deliveries resend``); so are ENOTDIR, EISDIR,
    ENAMETOOLONG, ELOOP, EFBIG and EINVAL. Errno values: POSIX
    (``<errno.h>``), as Python's :mod:`errno` names them.
    """
    return OutcomeClass.PERMANENT if exc.errno in _PERMANENT_ERRNO else OutcomeClass.TRANSIENT


def classify_association(result: int | None, source: int | None = None) -> OutcomeClass:
    """Classify an association that was not established.

    ``result`` and ``source`` are the A-ASSOCIATE-RJ Result and Source
    (PS3.8 9.3.4); ``None`` when there was no A-ASSOCIATE-RJ (connection
    refused, timed out, aborted), which is transient. Result 2
    (rejected-transient) is transient; result 1 (rejected-permanent) is
    permanent, except from source 3, the presentation service provider,
    whose only reasons are temporary congestion and a local limit exceeded.
    """
    if result is None or result == 2:
        return OutcomeClass.TRANSIENT
    if result == 1:
        return OutcomeClass.TRANSIENT if source == 3 else OutcomeClass.PERMANENT
    return OutcomeClass.TRANSIENT  # not a valid A-ASSOCIATE-RJ Result: treat like an abort


@dataclass(frozen=True)
class AssociationFailure:
    """Why an association was not established, and whether to try again."""

    reason: str  # "connection refused", "rejected (...)", "timed out ..."
    outcome: OutcomeClass
    result: int | None = None  # A-ASSOCIATE-RJ Result, where rejected
    source: int | None = None
    diagnostic: int | None = None


class AssociationWatch:
    """Watches one association request and says why it failed.

    pynetdicom reports a refused or timed-out TCP connection, a silent peer
    and an abort all as ``is_aborted``, and logs the socket error only. Bind
    :attr:`handlers` (``ae.associate(..., evt_handlers=watch.handlers)``),
    then call :meth:`explain`. Where the connection never opened, one
    probe (``socket.create_connection``, at most ``min(timeout, 5)`` s, then
    the TLS handshake with the same context where ``tls_args`` is given)
    finds the socket or TLS error again.

    Parameters
    ----------
    host, port:
        The peer, as given to ``associate``.
    timeout:
        The connection timeout used, seconds.
    tls_args:
        ``(ssl.SSLContext, server_hostname)`` as given to ``associate``, or None.
    """

    def __init__(self, host: str, port: int, timeout: float, tls_args: tuple | None = None):
        self.host, self.port, self.timeout, self.tls_args = host, port, timeout, tls_args
        self.probe_tcp_ok: bool | None = None  # None: no probe was needed
        self.connected = False
        self.accepted = False
        self.pdus_received = 0
        self.peer_abort: A_ABORT_RQ | None = None
        self.sent_abort = False
        self.started = time.monotonic()

    @property
    def handlers(self) -> list:
        return [
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_PDU_RECV, self._on_pdu_recv),
            (evt.EVT_PDU_SENT, self._on_pdu_sent),
        ]

    def _on_open(self, _event) -> None:
        self.connected = True

    def _on_accepted(self, _event) -> None:
        self.accepted = True

    def _on_pdu_recv(self, event) -> None:
        self.pdus_received += 1
        if isinstance(event.pdu, A_ABORT_RQ):
            self.peer_abort = event.pdu

    def _on_pdu_sent(self, event) -> None:
        if isinstance(event.pdu, A_ABORT_RQ):
            self.sent_abort = True

    def explain(self, assoc) -> AssociationFailure | None:
        """None where ``assoc`` is established, else why not."""
        if assoc.is_established:
            return None
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            reason = f"rejected ({rj.result_str.lower()}; source: {rj.source_str}; reason: {rj.reason_str})"
            return AssociationFailure(
                reason, classify_association(rj.result, rj.result_source), rj.result, rj.result_source, rj.diagnostic
            )
        if self.accepted:
            # pynetdicom aborts an accepted association with no presentation context.
            return AssociationFailure(
                "accepted with no presentation context: the peer takes none of the SOP classes "
                "and transfer syntaxes offered",
                OutcomeClass.PERMANENT,
            )
        if not self.connected:
            return AssociationFailure(self._probe(), OutcomeClass.TRANSIENT)
        if self.peer_abort is not None:
            p = self.peer_abort
            return AssociationFailure(f"aborted by the peer ({p.source_str}: {p.reason_str})", OutcomeClass.TRANSIENT)
        if not self.pdus_received:
            if self.sent_abort:  # pynetdicom aborts when the ACSE timeout expires
                waited = time.monotonic() - self.started
                return AssociationFailure(
                    f"timed out: no A-ASSOCIATE response after {waited:.1f} s", OutcomeClass.TRANSIENT
                )
            return AssociationFailure(
                "connection closed by the peer before it answered the A-ASSOCIATE-RQ", OutcomeClass.TRANSIENT
            )
        return AssociationFailure("aborted (invalid A-ASSOCIATE response)", OutcomeClass.TRANSIENT)

    def _probe(self) -> str:
        self.probe_tcp_ok = False
        try:
            sock = socket.create_connection((self.host, self.port), timeout=min(self.timeout, 5.0))
        except ConnectionRefusedError:
            return "connection refused"
        except TimeoutError:
            return f"timed out connecting (TCP, {self.timeout:g} s)"
        except socket.gaierror as exc:
            return f"host not found ({exc.strerror})"
        except OSError as exc:
            return f"cannot connect ({exc.strerror or exc})"
        self.probe_tcp_ok = True
        with sock:
            if self.tls_args is None:
                return "connection failed, but a TCP probe now connects (the peer just came up?)"
            context, server_hostname = self.tls_args
            try:
                with context.wrap_socket(sock, server_hostname=server_hostname):
                    pass
            except ssl.SSLError as exc:
                detail = getattr(exc, "verify_message", None)  # why a certificate was not trusted
                return f"TLS handshake failed ({exc.reason or exc}{': ' + detail if detail else ''})"
            except OSError as exc:  # reset or closed by the peer during the handshake
                return f"TLS handshake failed ({exc.strerror or exc})"
        return "connection failed, but a TLS probe now connects (the peer just came up?)"
