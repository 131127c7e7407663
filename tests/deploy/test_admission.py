"""Who gets into a federation: registered hospitals over TLS, nobody else.

Real processes on loopback: `fedward server start` (Flower's SuperLink with TLS and SuperNode
authentication) and `fedward client start` (Flower's SuperNode); no training run is needed.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request

import pytest


def test_registered_hospitals_are_admitted_over_tls(federation):
    for name in ("north", "south"):
        process = federation.hospitals[name]
        assert process.running()
        assert "SuperNode ID" in process.log()
    listed = federation.cli(
        "server", "nodes", "--server", federation.address, "--ca", str(federation.certs / "ca.crt")
    )
    assert listed.returncode == 0, listed.stderr
    online = [line for line in listed.stdout.splitlines() if "online" in line]
    for name in ("north", "south"):
        assert any(str(federation.node_ids[name]) in line for line in online), listed.stdout


def test_an_unregistered_hospital_is_refused(federation):
    intruder = federation.start_hospital("intruder", "--max-wait-time", "30", wait=False)
    code = intruder.wait(timeout=120)
    assert code != 0
    log = intruder.log()
    assert "SuperNode ID" not in log  # never activated, so never given work
    assert "Failed to activate SuperNode" in log
    assert "No SuperNode found with the given public key" in federation.server.log()


def test_a_plaintext_client_cannot_connect(federation):
    site = federation.site("intruder")
    # fedward refuses to start a hospital without TLS but with a node key ...
    refused = federation.cli(
        "client",
        "start",
        "--server",
        federation.address,
        "--data",
        str(site / "notes.csv"),
        "--policy",
        str(site / "policy.toml"),
        "--key",
        str(site / "intruder.key"),
        "--dataset-id",
        "intruder-notes",
        "--insecure",
    )
    assert refused.returncode == 2
    assert "node authentication needs TLS" in refused.stderr
    # ... a plain-HTTP SuperNode gets nowhere with the TLS SuperLink ...
    plain = federation.spawn(
        "intruder-plain.log",
        "client",
        "start",
        "--server",
        federation.address,
        "--data",
        str(site / "notes.csv"),
        "--policy",
        str(site / "policy.toml"),
        "--ledger",
        str(site / "ledger-plain"),
        "--dataset-id",
        "intruder-notes",
        "--insecure",
        "--max-wait-time",
        "15",
        "--runtime-port",
        str(federation.free_port()),
    )
    assert plain.wait(timeout=120) != 0
    assert "SuperNode ID" not in plain.log()
    assert "could not establish a connection to the SuperLink" in plain.log()
    # ... and neither does any plain HTTP request to the Fleet API.
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        urllib.request.urlopen(
            f"http://{federation.address}/v1/fleet/activate-node", data=b"{}", timeout=10
        )


def test_the_server_refuses_insecure_mode_with_node_authentication(federation):
    done = federation.cli("server", "start", "--insecure", "--port", "1")
    assert done.returncode == 2
    assert "SuperNode authentication needs TLS" in done.stderr
