"""A hospital's commands: `fedward client start | personalize | ledger | model-hash |
adapter-hash | signing-key`.

Only this module prints; client/deploy/supernode.py and client/site/ do the work.
`simulation/cli.py` mounts `client_app` on the `fedward` command.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedward.client.deploy import supernode
from fedward.client.policy import SitePolicy, model_content_hash
from fedward.common.config import DataSchema, LocalSettings
from fedward.common.errors import DataError
from fedward.common.files.output_paths import check_output_file, check_output_folder

log = logging.getLogger(__name__)
console = Console()
error_console = Console(stderr=True)

client_app = typer.Typer(
    no_args_is_help=True, help="A hospital's SuperNode, privacy ledger and policy tools."
)

LedgerOption = Annotated[
    Path, typer.Option("--ledger", help="Folder of the privacy ledgers (keep and back it up).")
]


def data_schema(
    text_column: str,
    label_column: str,
    patient_column: str | None,
    val_fraction: float,
    source: str,
) -> DataSchema:
    """How this hospital's data file is read, from its flags (`ConfigError` naming a bad one)."""
    return DataSchema.build(
        {
            "text_column": text_column,
            "label_column": label_column,
            "patient_column": patient_column,
            "val_fraction": val_fraction,
        },
        source=source,
    )


# `fedward client start`'s options beyond where to connect and what to read.
DatasetIdOption = Annotated[
    str | None,
    typer.Option(
        "--dataset-id",
        help="Name of this data set's privacy ledger (required); keep it when records "
        "change or files are renamed: the budget continues.",
    ),
]
AuditLogOption = Annotated[
    Path | None, typer.Option(help="This hospital's audit log [default: <ledger>/audit.jsonl].")
]
RuntimePortOption = Annotated[
    int, typer.Option(help="Local port of the SuperNode's Runtime API (one per SuperNode).")
]
InsecureOption = Annotated[
    bool, typer.Option("--insecure", help="No TLS, no node key (test federations only).")
]
MaxWaitTimeOption = Annotated[
    float | None,
    typer.Option(help="Stop reconnecting after this many seconds [default: never]."),
]
TextColumnOption = Annotated[
    str, typer.Option(help="Column of the data file holding the note text.")
]
LabelColumnOption = Annotated[str, typer.Option(help="Column of the data file holding the label.")]
PatientColumnOption = Annotated[
    str | None,
    typer.Option(
        help="Column naming the patient of each record (a field of each entity-JSON record "
        "for NER): needed for patient-level DP (policy dp_unit = patient)."
    ),
]
ValFractionOption = Annotated[float, typer.Option(help="Share of the records kept for validation.")]
PrefixCacheOption = Annotated[
    bool,
    typer.Option(
        help="Compute the frozen layers' outputs once per run and train the layers above on "
        "them (faster; same updates and DP guarantee). Off: recompute in every epoch."
    ),
]
PrefixCacheMbOption = Annotated[
    int,
    typer.Option(
        help="Memory (MiB) the prefix cache may hold; past it, a private temporary folder."
    ),
]
OwnModelOption = Annotated[
    bool,
    typer.Option(
        help="At a run's last round, fit this hospital's own model from the global one and "
        "its own notes, with its alone / global / own report, into <ledger>/own/ (not DP: "
        "kept here, never sent)."
    ),
]


@client_app.command("start")
def start(
    server: Annotated[
        str, typer.Option("--server", help="The coordinator's SuperLink, HOST:PORT.")
    ],
    data: Annotated[
        Path, typer.Option("--data", help="This hospital's data file; it never leaves.")
    ],
    policy: Annotated[Path, typer.Option("--policy", help="The site policy (TOML).")],
    ca: Annotated[Path | None, typer.Option("--ca", help="The federation's ca.crt.")] = None,
    key: Annotated[
        Path | None, typer.Option("--key", help="This hospital's node key (`fedward keys node`).")
    ] = None,
    ledger: LedgerOption = Path("fedward-ledger"),
    name: Annotated[
        str | None, typer.Option(help="Name shown to the coordinator [default: the key's name].")
    ] = None,
    dataset_id: DatasetIdOption = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    audit_log: AuditLogOption = None,
    runtime_port: RuntimePortOption = supernode.DEFAULT_RUNTIME_PORT,
    insecure: InsecureOption = False,
    max_wait_time: MaxWaitTimeOption = None,
    text_column: TextColumnOption = "text",
    label_column: LabelColumnOption = "label",
    patient_column: PatientColumnOption = None,
    val_fraction: ValFractionOption = 0.2,
    prefix_cache: PrefixCacheOption = LocalSettings.model_fields["prefix_cache"].default,
    prefix_cache_mb: PrefixCacheMbOption = LocalSettings.model_fields["prefix_cache_mb"].default,
    own_model: OwnModelOption = LocalSettings.model_fields["own_model"].default,
) -> None:
    """Run this hospital's Flower SuperNode (in the foreground), under its site policy.

    Every message is handled by fedward's own ClientApp, installed here; an app bundle that
    carries code, names another component or asks for dependencies is refused and audited.
    """
    check_output_folder(ledger, "--ledger")
    if audit_log is not None:
        check_output_file(audit_log, "--audit-log")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = supernode.HospitalSettings(
        server=server,
        data=data,
        policy=policy,
        ledger=ledger,
        ca=ca,
        key=key,
        name=name or (key.stem if key is not None else "hospital"),
        dataset_id=dataset_id,
        device=device,
        audit_log=audit_log,
        runtime_port=runtime_port,
        insecure=insecure,
        max_wait_time=max_wait_time,
        schema=data_schema(
            text_column, label_column, patient_column, val_fraction, "fedward client start"
        ),
        prefix_cache=prefix_cache,
        prefix_cache_mb=prefix_cache_mb,
        own_model=own_model,
    )
    command = supernode.prepare_supernode(settings)
    if insecure:
        warning = (
            "INSECURE MODE: TLS and node authentication are OFF; updates travel in plain text "
            "and the coordinator cannot tell this hospital from anyone else. Testing only."
        )
        log.warning(warning)
        error_console.print(f"[bold red]WARNING: {warning}[/]", highlight=False)
    console.print(
        f"fedward client: hospital {settings.name} -> {server}; data {data} (data set "
        f"{settings.dataset_id}); policy {policy}; ledger {ledger}"
    )
    raise typer.Exit(supernode.run_supernode(command, settings))


@client_app.command("personalize")
def personalize_command(
    adapter: Annotated[
        Path, typer.Option(help="A global adapter folder (a run's `adapter`, PEFT format).")
    ],
    data: Annotated[Path, typer.Option(help="This hospital's data file (CSV/JSONL/CoNLL).")],
    out: Annotated[Path, typer.Option(help="Where to write the own adapter and report.")],
    text_column: Annotated[str, typer.Option(help="Column holding the note text.")] = "text",
    label_column: Annotated[str, typer.Option(help="Column holding the label.")] = "label",
    patient_column: Annotated[
        str | None, typer.Option(help="Column naming each record's patient (kept whole).")
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Share of the patients (or records) kept for validation.")
    ] = 0.2,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the splits and of home training.")] = 42,
) -> None:
    """Fit this hospital's own model from a global adapter and its own notes, at home.

    The same code a hospital runs at a run's last round: alone / global / own scored on its
    validation notes, the own adapter and report.json written to --out (this account only).
    Nothing is sent; the own adapter is not DP: do not share it. `fedward predict --adapter
    OUT/adapter` reads it.
    """
    import json

    from fedward.client.app import read_hospital_file
    from fedward.client.model_cache import cached_model
    from fedward.client.own_model import keep_at_home, own_model
    from fedward.common.config import LocalRun, RunSpec
    from fedward.common.errors import ModelError
    from fedward.common.model import get_adapter_arrays, load_adapter_for_inference

    check_output_folder(out, "--out")
    loaded, _, meta = load_adapter_for_inference(adapter)
    spec = RunSpec.from_flat(
        {
            "task": meta["task"],
            "model": meta["model"],
            "labels": meta["labels"],
            "lora_variant": meta["lora_variant"],
            "lora_layers": meta["lora_layers"],
            "max_length": meta["max_length"],
            "seed": seed,
            "dp": False,
        },
        source=str(adapter / "fedward.json"),
    )
    schema = data_schema(
        text_column, label_column, patient_column, val_fraction, "fedward client personalize"
    )
    config = LocalRun(spec=spec, local=LocalSettings.build({"device": device}), data_schema=schema)
    name = data.stem
    records = read_hospital_file(data, spec.task, schema, spec.training.seed, name)
    # the tensors a run's adapter travels with, by the names this setup's model gives them
    model = cached_model(spec.model, spec.task, spec.training.seed, len(meta["labels"]))
    names = get_adapter_arrays(model).keys()
    parameters = dict(loaded.named_parameters())
    missing = [name for name in names if name not in parameters]
    if missing:
        raise ModelError(f"{adapter}: not an adapter of this setup (no {missing[0]})")
    global_arrays = {name: parameters[name].detach().cpu().numpy().copy() for name in names}
    own = own_model(records, config, global_arrays)
    folder = keep_at_home(own, out, name)
    report = own.report
    table = Table(title=f"worth joining ({report.metric} on {len(records.val)} validation notes)")
    for column in ("alone", "global", "own", "own - alone", "own is"):
        table.add_column(column)
    table.add_row(
        f"{report.alone:.3f}",
        f"{report.global_:.3f}",
        f"{report.own:.3f}",
        f"{100 * report.gain:+.1f} pts",
        report.own_method,
    )
    console.print(table)
    console.print(f"own adapter: {folder / 'adapter'}  (not DP: keep it at the hospital)")
    console.print(f"report:      {folder / 'report.json'}")
    log.debug("report %s", json.dumps(report.as_dict()))


@client_app.command("ledger")
def ledger_command(
    ledger: LedgerOption = Path("fedward-ledger"),
    dataset_id: Annotated[
        str | None,
        typer.Option("--dataset-id", help="Show only this data set's ledger (its data-set id)."),
    ] = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="Show totals at the policy's delta and budget.")
    ] = None,
) -> None:
    """Print the privacy ledger: every DP round each local data set took part in.

    A round marked "reserved" was planned but never confirmed or released: in progress now, or
    its process died. It counts as spent (the ledger never under-counts).
    """
    from fedward.client.privacy.ledger import RESERVED, PrivacyLedger  # imports opacus: only here

    site_policy = SitePolicy.load(policy) if policy is not None else None
    if dataset_id is not None:
        ledgers = [PrivacyLedger.open(ledger, dataset_id)]
        ledgers = [item for item in ledgers if item.path.is_file()]
    elif ledger.is_dir():
        ledgers = PrivacyLedger.all_in(ledger)
    else:
        raise DataError(f"{ledger}: ledger folder not found; check --ledger")
    if not ledgers:
        console.print(
            f"{ledger}: no privacy spent yet" + (f" on {dataset_id}" if dataset_id else "")
        )
        return
    delta = site_policy.max_delta if site_policy is not None else None
    for item in ledgers:
        rows = item.describe(delta)
        title = f"data set {item.dataset}" + (f" ({item.description})" if item.description else "")
        table = Table(title=title, header_style="bold")
        for column in (
            "run",
            "round",
            "noise σ",
            "sample rate",
            "steps",
            "δ",
            "ε round",
            "ε total",
            "status",
            "data sha256",
            "recorded",
        ):
            left = column in ("run", "status", "data sha256", "recorded")
            table.add_column(column, justify="left" if left else "right")
        for row in rows:
            table.add_row(
                row.run_id[:12],
                str(row.round),
                f"{row.noise_multiplier:.3f}",
                f"{row.sample_rate:.4f}",
                str(row.steps),
                f"{row.delta:g}",
                f"{row.epsilon_round:.3f}",
                f"{row.epsilon_total:.3f}",
                "[bold yellow]reserved[/]" if row.status == RESERVED else row.status,
                (row.data_sha256 or "")[:12],
                row.recorded_at,
            )
        console.print(table)
        spent = rows[-1].epsilon_total if rows else 0.0
        unit = item.unit or "record"  # what every epsilon of this data set protects
        line = f"spent: epsilon {spent:.3f} per {unit} over {len(rows)} rounds"
        reserved = len(item.reservations())
        if reserved:
            line += (
                f", of which {reserved} reserved (in progress, or left by a process that died: "
                "counted as spent)"
            )
        if site_policy is not None:
            line += (
                f" of the site budget {site_policy.lifetime_epsilon:g}"
                f" (delta {site_policy.max_delta:g})"
            )
        console.print(line)


@client_app.command("model-hash")
def model_hash(
    path: Annotated[Path, typer.Argument(help="A local model folder (or weight file).")],
) -> None:
    """Print a model's content hash, for the site policy's allowed_model_hashes."""
    console.print(model_content_hash(path), highlight=False)


@client_app.command("adapter-hash")
def adapter_hash(
    path: Annotated[Path, typer.Argument(help="A fedward adapter folder (init_adapter).")],
) -> None:
    """Print a starting adapter's content hash, for the site policy's allowed_adapter_hashes.

    It covers every file of the folder: weights, adapter_config.json and fedward.json (its
    labels), so an adapter changed in any of them needs a new approval.
    """
    from fedward.common.warm_start import adapter_content_hash

    console.print(adapter_content_hash(path), highlight=False)


@client_app.command("signing-key")
def signing_key(
    path: Annotated[Path, typer.Argument(help="The hospital's SecAgg signing key file (PEM).")],
    replace: Annotated[
        bool,
        typer.Option(
            "--replace", help="Make a new key over an existing one (every roster must re-pin)."
        ),
    ] = False,
) -> None:
    """Make this hospital's SecAgg signing key once, and print its public key for the other
    hospitals' secagg_roster; run again, it prints the key it made, and changes nothing.
    """
    from fedward.client.secagg import signing_public_key, write_signing_key

    if path.exists() and not replace:
        public = signing_public_key(path)
        error_console.print(f"{path}: kept (the key already made); its public key:")
    else:
        public = write_signing_key(path, replace=replace)
        error_console.print(f"{path}: new signing key (mode 0600, keep it); its public key:")
    console.print(f"ed25519:{public}", highlight=False)
