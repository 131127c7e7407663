"""TLS certificates for the SuperLink and authentication keys for hospitals' SuperNodes.

Made with `cryptography` alone (no openssl binary), in the formats Flower 1.41 reads:

- `init_ca_and_server`: a private certificate authority (`ca.crt`, `ca.key`) and a server
  certificate it signs (`server.pem`, `server.key`) whose subject alternative names list every
  DNS name and IP address hospitals will dial. The SuperLink takes
  `--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key`; each SuperNode
  and `flwr` CLI takes `ca.crt` as its root certificate.
- `make_node_keys`: a hospital's SuperNode key pair, ECDSA on NIST P-384 in OpenSSH format, the
  format `flower-supernode --auth-supernode-private-key` (`load_ssh_private_key`, EC only) and
  `flwr supernode register <public key>` (`load_ssh_public_key`, NIST curves only) load.

Private keys are written with permissions 0600 and without a passphrase (the SuperLink and
SuperNode load them unattended). Keep `ca.key` offline once the server certificate is made; only
`ca.crt` is shared.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedward.common.errors import ConfigError
from fedward.common.files.atomic import write_bytes_atomic

logger = logging.getLogger(__name__)

PRIVATE_KEY_MODE = 0o600
PUBLIC_FILE_MODE = 0o644

#: Curve of the TLS keys (P-256: supported by every TLS stack Flower uses: gRPC and Python ssl).
TLS_CURVE = ec.SECP256R1
#: Curve of SuperNode authentication keys (P-384: what Flower itself generates).
NODE_AUTH_CURVE = ec.SECP384R1

_DNS_NAME = re.compile(
    r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ServerCertificates:
    """Where `init_ca_and_server` wrote its files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    """Where `make_node_keys` wrote one SuperNode's key pair."""

    private_key: Path
    public_key: Path


def init_ca_and_server(
    out_dir: str | Path,
    server_names: list[str],
    days: int = 365,
    ca_days: int = 3650,
    overwrite: bool = False,
) -> ServerCertificates:
    """Create a CA and a server certificate for the SuperLink in `out_dir`.

    Args:
        out_dir: Folder for `ca.crt`, `ca.key`, `server.pem`, `server.key` (created if needed).
        server_names: DNS names and IP addresses hospitals connect to, e.g.
            `["fl.hospital-network.org", "10.0.0.5", "localhost", "127.0.0.1"]`; the first is
            the certificate's common name.
        days: Validity of the server certificate.
        ca_days: Validity of the CA certificate.
        overwrite: Replace existing files; by default existing files raise `ConfigError`, so a
            CA that hospitals already trust is never replaced by accident.
    """
    out_dir = Path(out_dir)
    if not server_names:
        raise ConfigError(
            "server names: give at least one DNS name or IP address the SuperLink is reached at"
        )
    if days < 1 or ca_days < days:
        raise ConfigError(f"days: need 1 <= days ({days}) <= ca_days ({ca_days})")
    alt_names = [_alt_name(name) for name in server_names]
    paths = ServerCertificates(
        ca_cert=out_dir / "ca.crt",
        ca_key=out_dir / "ca.key",
        server_cert=out_dir / "server.pem",
        server_key=out_dir / "server.key",
    )
    _refuse_existing([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)

    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(minutes=5)  # tolerate small clock differences
    ca_key = ec.generate_private_key(TLS_CURVE())
    ca_cert = _ca_certificate(ca_key, not_before, now + datetime.timedelta(days=ca_days))
    server_key = ec.generate_private_key(TLS_CURVE())
    server_cert = _server_certificate(
        server_key,
        server_names[0],
        alt_names,
        ca_cert,
        ca_key,
        not_before,
        now + datetime.timedelta(days=days),
    )

    write_bytes_atomic(paths.ca_key, _private_pem(ca_key), mode=PRIVATE_KEY_MODE)
    write_bytes_atomic(paths.server_key, _private_pem(server_key), mode=PRIVATE_KEY_MODE)
    pem = serialization.Encoding.PEM
    write_bytes_atomic(paths.ca_cert, ca_cert.public_bytes(pem), mode=PUBLIC_FILE_MODE)
    write_bytes_atomic(paths.server_cert, server_cert.public_bytes(pem), mode=PUBLIC_FILE_MODE)
    logger.info(
        "wrote CA and server certificate for %s to %s (server cert valid %d days)",
        ", ".join(server_names),
        out_dir,
        days,
    )
    return paths


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """A CA signs certificates and revocation lists; a TLS server signs and agrees keys."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not signs_certificates,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    """The federation's self-signed CA certificate: it signs server certificates only."""
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedward"),
            x509.NameAttribute(NameOID.COMMON_NAME, "fedward federation CA"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _server_certificate(
    server_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    alt_names: list[x509.GeneralName],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    """The SuperLink's TLS server certificate for `alt_names`, signed by the CA."""
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedward"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def make_node_keys(out_dir: str | Path, name: str, overwrite: bool = False) -> NodeKeys:
    """Create a SuperNode authentication key pair `<name>.key` / `<name>.pub` in `out_dir`.

    The hospital keeps `<name>.key` (0600) and starts its SuperNode with
    `--auth-supernode-private-key <name>.key`; the coordinator registers `<name>.pub` with
    `flwr supernode register <name>.pub <connection>`. Existing files raise `ConfigError`
    unless `overwrite`.
    """
    if not _NODE_NAME.match(name):
        raise ConfigError(
            f"node name {name!r}: use letters, digits, '.', '_' or '-' (at most 64), "
            "e.g. 'hospital-a'"
        )
    out_dir = Path(out_dir)
    paths = NodeKeys(private_key=out_dir / f"{name}.key", public_key=out_dir / f"{name}.pub")
    _refuse_existing([paths.private_key, paths.public_key], overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)

    key = ec.generate_private_key(NODE_AUTH_CURVE())
    private_ssh = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.OpenSSH,
        encryption_algorithm=serialization.NoEncryption(),
    )
    public_ssh = key.public_key().public_bytes(
        encoding=serialization.Encoding.OpenSSH,
        format=serialization.PublicFormat.OpenSSH,
    )
    write_bytes_atomic(paths.private_key, private_ssh, mode=PRIVATE_KEY_MODE)
    write_bytes_atomic(
        paths.public_key, public_ssh + f" {name}\n".encode("ascii"), mode=PUBLIC_FILE_MODE
    )
    logger.info("wrote SuperNode key pair %s / %s", paths.private_key, paths.public_key)
    return paths


def _alt_name(name: str) -> x509.GeneralName:
    name = name.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _DNS_NAME.match(name):
        raise ConfigError(
            f"server name {name!r}: not a DNS name or IP address "
            "(e.g. 'fl.example.org', 'localhost', '10.0.0.5')"
        )
    return x509.DNSName(name.lower())


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{existing[0]}: already exists; refusing to replace keys or certificates others "
            "may already trust. Choose another folder or pass overwrite (--force)"
        )
