"""Test certificates for DICOM TLS, made with ``cryptography``.

:func:`make_pki` writes, as PEM files:

- ``ca.crt``: the test CA (self-signed);
- ``server.crt``/``server.key``: signed by the CA, SAN ``127.0.0.1`` and
  ``localhost``, usable as server and client (Orthanc uses one certificate
  both ways);
- ``client.crt``/``client.key``: a modality's client certificate, signed by
  the CA;
- ``other-ca.crt``, ``other-client.crt``/``other-client.key``: a second CA and
  a client certificate it signed, which our CA does not trust.

RSA 2048: accepted by every TLS profile dcmtk (and so Orthanc) offers.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path
    #: RFC 4514 subject of client.crt
    client_subject: str


def _name(cn: str, org: str = "dicom-ai-node tests") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(key: rsa.RSAPrivateKey, path: Path, password: bytes | None = None) -> Path:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, encryption))
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _builder(subject: x509.Name, issuer: x509.Name, key) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
    )


def make_ca(cn: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _key()
    cert = (
        _builder(_name(cn), _name(cn), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(ca: tuple[x509.Certificate, rsa.RSAPrivateKey], cn: str, *, server: bool) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A leaf certificate signed by ``ca``; ``server=True`` adds the loopback
    SAN and both server and client authentication."""
    ca_cert, ca_key = ca
    key = _key()
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        _builder(_name(cn), ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(folder: Path) -> Pki:
    """Write the CA, server, client and "other CA" files into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = make_ca("dicom-ai-node test CA")
    other = make_ca("some other CA")
    server = issue(ca, "127.0.0.1", server=True)
    client = issue(ca, "MODALITY", server=False)
    stranger = issue(other, "STRANGER", server=False)
    return Pki(
        ca=_write_cert(ca[0], folder / "ca.crt"),
        server_cert=_write_cert(server[0], folder / "server.crt"),
        server_key=_write_key(server[1], folder / "server.key"),
        client_cert=_write_cert(client[0], folder / "client.crt"),
        client_key=_write_key(client[1], folder / "client.key"),
        other_ca=_write_cert(other[0], folder / "other-ca.crt"),
        other_client_cert=_write_cert(stranger[0], folder / "other-client.crt"),
        other_client_key=_write_key(stranger[1], folder / "other-client.key"),
        client_subject=client[0].subject.rfc4514_string(),
    )


def write_encrypted_key(source_key: Path, path: Path, password: str) -> Path:
    """``source_key`` again, encrypted with ``password`` (for ``key_password``)."""
    key = serialization.load_pem_private_key(source_key.read_bytes(), password=None)
    return _write_key(key, path, password.encode())  # type: ignore[arg-type]
