"""``kind = "dicom"``: a C-STORE SCP (PS3.4 Annex B), over DICOM TLS (PS3.15
B.9) when the destination has a ``tls`` table.

One association per batch, one presentation context per SOP Class with the
files' transfer syntaxes (uncompressed ones may also go as Explicit or
Implicit VR Little Endian). Statuses are classified by :mod:`node.outcome`;
why an association failed (refused, timed out, rejected, TLS) by its
:class:`~node.outcome.AssociationWatch`. :meth:`DicomSender.echo` is a C-ECHO
(Verification, PS3.4 Annex A).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pydicom
from pydantic import BaseModel, ConfigDict, Field, FilePath, SecretStr, field_validator, model_validator
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.destinations.base import DestinationConfig, DestinationKind
from node.outcome import AssociationWatch, Outcome, OutcomeClass, classify_dimse, dimse_status_text
from node.secrets import secret_or_file
from node.tls import TlsVersion, client_context, tls_args


def _ae_title(value: str) -> str:
    # node.config imports this module (through the registry): import it when validating.
    from node.config import _check_ae_title

    return _check_ae_title(value)


class DestinationTls(BaseModel):
    """A ``dicom`` destination's ``tls`` table: C-STORE over DICOM TLS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca: FilePath | None = Field(None, description="PEM CA certificate(s) of the SCP; none uses the system's.")
    certificate: FilePath | None = Field(None, description="Our client certificate, for SCPs that require one.")
    key: FilePath | None = None
    key_password: SecretStr | None = Field(None, description="Passphrase of an encrypted key.")
    key_password_file: Path | None = None
    verify_hostname: bool = Field(True, description="Check the SCP's certificate names the host (SAN).")
    server_hostname: str | None = Field(None, description="Name to check instead of host.")
    minimum_version: TlsVersion = TlsVersion.TLS_1_2

    _secrets = secret_or_file("key_password")

    @model_validator(mode="after")
    def _loads(self) -> DestinationTls:
        if (self.certificate is None) != (self.key is None):
            raise ValueError("certificate, key: give both or neither")
        client_context(self)  # a wrong passphrase or file fails at load, not at the first association
        return self


class DicomDestination(DestinationConfig):
    """A C-STORE SCP."""

    kind: Literal["dicom"]
    ae_title: str = Field(description="The SCP's AE title (Called AE Title, PS3.8 7.1.1.4).")
    host: str
    port: int = Field(ge=1, le=65535)
    tls: DestinationTls | None = Field(None, description="DICOM TLS to this SCP; absent: plain TCP.")

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))


def c_echo(
    ae_title: str, host: str, port: int, *, calling_ae: str, timeout: float, tls: DestinationTls | None = None
) -> Outcome:
    """C-ECHO ``ae_title@host:port`` (PS3.7 9.1.5); the outcome's text is
    ``C-ECHO status 0x0000 (Success)`` or why the association failed.

    ``timeout`` (seconds) bounds the TCP connect, the TLS handshake and each
    response. Never raises for a peer's fault.
    """
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.connection_timeout = ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    pair = tls_args(tls, host)
    watch = AssociationWatch(host, port, timeout, pair)
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=pair, evt_handlers=watch.handlers)
    failure = watch.explain(assoc)
    if failure is not None:
        why = f"association failed: {failure.reason} ({failure.outcome})" + (" (DICOM TLS)" if tls else "")
        return Outcome(failure.outcome, None, why)
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if not status or "Status" not in status:
        return Outcome(OutcomeClass.TRANSIENT, None, "no C-ECHO response (connection lost or timed out)")
    code = int(status.Status)
    return Outcome(classify_dimse(code), f"0x{code:04X}", f"C-ECHO status {dimse_status_text(code)}")


class DicomSender(DestinationKind):
    """C-STORE SCU to one destination."""

    kind = "dicom"
    Config = DicomDestination
    config: DicomDestination

    def __init__(self, config: DicomDestination, context=None):
        super().__init__(config, context)
        # DICOM TLS (PS3.15 B.9) when the destination has a tls table; built once.
        self.tls_args = tls_args(config.tls, config.host)

    @property
    def target(self) -> str:
        return f"{self.config.ae_title}@{self.config.host}:{self.config.port}"

    def classify(self, result: object) -> OutcomeClass:
        """``result``: a C-STORE or C-ECHO response Status (int)."""
        if not isinstance(result, int):
            raise TypeError(f"expected a DIMSE status (int), got {type(result).__name__}")
        return classify_dimse(result)

    def echo(self) -> Outcome:
        d = self.config
        return c_echo(d.ae_title, d.host, d.port, calling_ae=self.context.calling_ae, timeout=d.timeout_seconds, tls=d.tls)

    def _ae(self, datasets: Sequence[pydicom.Dataset]) -> AE:
        ae = AE(ae_title=self.context.calling_ae)
        # connection_timeout bounds the TCP connect and the TLS handshake too.
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.config.timeout_seconds
        contexts: dict[str, list] = {}
        for ds in datasets:
            ts = ds.file_meta.TransferSyntaxUID
            syntaxes = [ts] if ts.is_compressed else [ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            contexts.setdefault(ds.SOPClassUID, [])
            for s in syntaxes:
                if s not in contexts[ds.SOPClassUID]:
                    contexts[ds.SOPClassUID].append(s)
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, syntaxes)
        return ae

    def send(self, paths: Sequence[Path]) -> list[Outcome]:
        d = self.config
        datasets = [pydicom.dcmread(p) for p in paths]
        watch = AssociationWatch(d.host, d.port, d.timeout_seconds, self.tls_args)
        assoc = self._ae(datasets).associate(
            d.host, d.port, ae_title=d.ae_title, tls_args=self.tls_args, evt_handlers=watch.handlers
        )
        failure = watch.explain(assoc)
        if failure is not None:
            why = failure.reason
            if self.tls_args and watch.probe_tcp_ok:
                why += " (DICOM TLS: pynetdicom's log has the handshake error)"
            err = f"association to {self.target} failed: {why}"
            return [Outcome(failure.outcome, None, err) for _ in paths]
        try:
            return [self._store(assoc, ds) for ds in datasets]
        finally:
            if assoc.is_established:
                assoc.release()

    def _store(self, assoc, ds: pydicom.Dataset) -> Outcome:
        try:
            status = assoc.send_c_store(ds)
        except (AttributeError, ValueError) as exc:
            # No accepted presentation context for this SOP class and transfer
            # syntax, or a data set that cannot be encoded: a retry sends the same.
            return Outcome(OutcomeClass.PERMANENT, None, f"C-STORE not sent: {exc}")
        except RuntimeError as exc:  # the association ended (peer abort) mid-batch
            return Outcome(OutcomeClass.TRANSIENT, None, f"C-STORE not sent: {exc}")
        if not status or "Status" not in status:
            return Outcome(OutcomeClass.TRANSIENT, None, "no C-STORE response (connection lost or timed out)")
        code = int(status.Status)
        comment = status.get("ErrorComment") or ""
        return self.outcome(code, f"0x{code:04X}", f"C-STORE status {dimse_status_text(code)} {comment}".strip())
