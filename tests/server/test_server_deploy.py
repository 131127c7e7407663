"""The coordinator's launch settings and app bundle (server/deploy.py), without processes."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedward.common.config import RunConfig, flat_names
from fedward.common.errors import ConfigError
from fedward.server import deploy
from fedward.server.certs import init_ca_and_server


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    init_ca_and_server(folder, ["localhost", "127.0.0.1"])
    return folder


def _flag_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_the_superlink_starts_with_tls_node_auth_and_a_database_by_default(certs, tmp_path):
    settings = deploy.SuperLinkSettings(certs=certs, database=tmp_path / "link.db")
    command = deploy.superlink_command(settings)
    assert Path(command[0]).name == "flower-superlink"
    assert _flag_value(command, "--ssl-ca-certfile") == str(certs / "ca.crt")
    assert _flag_value(command, "--ssl-certfile") == str(certs / "server.pem")
    assert _flag_value(command, "--ssl-keyfile") == str(certs / "server.key")
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    assert "--disable-runtime-dependency-installation" in command
    assert _flag_value(command, "--database") == str(tmp_path / "link.db")
    assert _flag_value(command, "--host") == "127.0.0.1"


def test_insecure_mode_needs_node_auth_off_explicitly_and_is_announced(tmp_path):
    with pytest.raises(ConfigError, match="SuperNode authentication needs TLS"):
        deploy.superlink_command(deploy.SuperLinkSettings(certs=None, insecure=True))
    settings = deploy.SuperLinkSettings(certs=None, insecure=True, node_auth=False, database=None)
    command = deploy.superlink_command(settings)
    assert "--insecure" in command and "--enable-supernode-auth" not in command
    assert not any(flag.startswith("--ssl") for flag in command)
    warnings = " ".join(deploy.warnings_for(settings))
    assert "INSECURE MODE" in warnings and "forgotten on restart" in warnings


def test_missing_certificates_are_named(tmp_path):
    with pytest.raises(
        ConfigError, match=r"ca.crt: TLS file not found; create .*`fedward certs init"
    ):
        deploy.superlink_command(deploy.SuperLinkSettings(certs=tmp_path))


def test_listening_beyond_loopback_warns_about_the_control_api(certs):
    settings = deploy.SuperLinkSettings(certs=certs, host="0.0.0.0")
    assert any("Control API" in warning for warning in deploy.warnings_for(settings))
    assert deploy.warnings_for(deploy.SuperLinkSettings(certs=certs)) == []


def test_the_app_bundle_carries_the_run_config_exactly(tiny_model_dir):
    config = RunConfig(
        model=tiny_model_dir,
        labels=["a b", 'c"d'],
        rounds=4,
        target_epsilon=3.5,
        resume=True,
        out="/srv/out",
    )
    pyproject = tomllib.loads(deploy.app_pyproject(config.to_flower()))
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedward.server.app:app",
        "clientapp": "fedward.client.app:app",
    }
    table = app["config"]
    assert set(table) == {name.replace("_", "-") for name in flat_names(RunConfig)}
    assert RunConfig.from_flower(table) == config
    assert table["data"] == ""  # unset stays unset


def test_the_connection_file_points_at_the_ca(certs, tmp_path):
    connection = deploy.Connection("127.0.0.1:9999", certs / "ca.crt")
    parsed = tomllib.loads(connection.config_toml())
    entry = parsed["superlink"][parsed["superlink"]["default"]]
    assert entry == {
        "address": "127.0.0.1:9999",
        "root-certificates": str((certs / "ca.crt").resolve()),
    }
    assert (
        tomllib.loads(deploy.Connection("h:1", None, insecure=True).config_toml())["superlink"][
            deploy.CONNECTION
        ]["insecure"]
        is True
    )
    with pytest.raises(ConfigError, match="CA certificate not found"):
        deploy.Connection("h:1", tmp_path / "nope.crt").config_toml()


def test_following_a_resumed_run_shows_only_its_new_rounds():
    history = {"flower_run_id": "42", "first_round": 3, "rounds": [{"round": r} for r in (1, 2, 3)]}
    rows, seen = deploy._new_rows(history, 42, 0)
    assert rows == [{"round": 3}] and seen == 3
    assert deploy._new_rows(history, 42, seen) == ([], 3)
    assert deploy._new_rows({**history, "flower_run_id": "41"}, 42, 0) == ([], 0)  # older run
    assert deploy._new_rows(None, 42, 0) == ([], 0)  # not written yet
