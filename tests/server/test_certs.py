"""Certificates and SuperNode keys: they load the way Flower 1.41 loads them, and TLS works."""

import argparse
import ipaddress
import os
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from flwr.cli.supernode.register import try_load_public_key
from flwr.common.args import try_obtain_server_certificates
from flwr.supercore.primitives.asymmetric import (
    bytes_to_public_key,
    sign_message,
    verify_signature,
)
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

from fedward.common.errors import ConfigError
from fedward.server.certs import init_ca_and_server, make_node_keys


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    return init_ca_and_server(out, ["localhost", "127.0.0.1", "fl.example.org"], days=30)


def test_server_certificate_is_signed_by_the_ca_with_sans(certs):
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 30 <= lifetime.days <= 31


def test_private_keys_load_and_are_owner_only(certs):
    for key_path in (certs.ca_key, certs.server_key):
        key = load_pem_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    key = load_pem_private_key(certs.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_flower_superlink_accepts_the_files(certs):
    args = argparse.Namespace(
        ssl_certfile=str(certs.server_cert),
        ssl_keyfile=str(certs.server_key),
        ssl_ca_certfile=str(certs.ca_cert),
    )
    ca, _cert, key = try_obtain_server_certificates(args)
    assert ca.startswith(b"-----BEGIN CERTIFICATE") and key.startswith(b"-----BEGIN PRIVATE KEY")


def _handshake(certs, server_hostname):
    """TLS handshake on loopback: server uses server.pem/server.key, client trusts only ca.crt."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(certs.server_cert, certs.server_key)
    client_context = ssl.create_default_context(cafile=str(certs.ca_cert))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve():
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.recv(1)
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                client_context.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                tls.sendall(b"x")
                return tls.version()
        finally:
            thread.join(timeout=5)


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1"])
def test_tls_handshake_verifies_against_the_ca(certs, name):
    assert _handshake(certs, name) is not None


def test_tls_handshake_rejects_a_name_not_in_the_certificate(certs):
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(certs, "evil.example.org")


def test_node_keys_load_the_way_flower_loads_them(tmp_path):
    keys = make_node_keys(tmp_path, "hospital-a")
    assert stat.S_IMODE(os.stat(keys.private_key).st_mode) == 0o600
    # What `flower-supernode --auth-supernode-private-key` does with the file.
    private_key, public_key = _try_setup_client_authentication(
        argparse.Namespace(
            auth_supernode_private_key=str(keys.private_key), auth_supernode_public_key=None
        )
    )
    # What `flwr supernode register <public key>` sends to the SuperLink.
    registered = try_load_public_key(keys.public_key)
    # The SuperLink checks a signed timestamp against the registered public key.
    signature = sign_message(private_key, b"2025-01-01T00:00:00+00:00")
    assert verify_signature(
        bytes_to_public_key(registered), b"2025-01-01T00:00:00+00:00", signature
    )
    assert public_key.public_numbers() == bytes_to_public_key(registered).public_numbers()
    assert keys.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert keys.public_key.read_text().rstrip().endswith(" hospital-a")


def test_existing_files_are_not_replaced(tmp_path, certs):
    make_node_keys(tmp_path, "hospital-a")
    with pytest.raises(ConfigError, match="already exists"):
        make_node_keys(tmp_path, "hospital-a")
    first = (tmp_path / "hospital-a.pub").read_text()
    make_node_keys(tmp_path, "hospital-a", overwrite=True)
    assert (tmp_path / "hospital-a.pub").read_text() != first
    with pytest.raises(ConfigError, match="already exists"):
        init_ca_and_server(certs.ca_cert.parent, ["localhost"])


@pytest.mark.parametrize("names", [[], ["not a host name"], ["under_score.example"]])
def test_bad_server_names_are_refused(tmp_path, names):
    with pytest.raises(ConfigError, match="server name"):
        init_ca_and_server(tmp_path, names)
    assert list(tmp_path.iterdir()) == []


def test_bad_node_names_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="node name"):
        make_node_keys(tmp_path, "../hospital")
