"""`fedward simulate`: many hospitals on one machine, on Flower's simulation runtime (Ray)."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

from fedward.client.app import DataSource
from fedward.common.config import RunConfig, SimulationSettings
from fedward.server.app import RoundCallback, RunResult, build_server_app
from fedward.simulation.app import build_simulation_client_app
from fedward.simulation.hospitals import prepare_config, simulated_data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerResources:
    """CPUs and GPU share per simulated hospital, and how many run at once."""

    cpus_per_hospital: int
    gpus_per_hospital: float
    workers: int


def plan_workers(
    simulation: SimulationSettings, device: str, cpus: int | None = None, gpus: int | None = None
) -> WorkerResources:
    """Concurrent hospitals: what the machine holds (or `simulation.workers`), at most the
    hospitals.

    Each worker process holds one copy of the frozen base model, so memory grows with the
    number of workers, not with the number of hospitals.

    Args:
        simulation: The simulation's settings (hospitals, workers, CPUs and GPU share per
            hospital).
        device: The local settings' `device`: "cpu" gives the hospitals no GPU share.
        cpus: CPU cores of the machine; None counts them.
        gpus: GPUs of the machine; None counts them.

    Returns:
        CPUs and GPU share per hospital, and how many hospitals run at once.
    """
    import torch

    cpus = cpus or os.cpu_count() or 1
    gpus = torch.cuda.device_count() if gpus is None else gpus
    per_hospital = simulation.cpus_per_hospital
    workers = simulation.workers or max(1, cpus // per_hospital)
    workers = max(1, min(simulation.hospitals, workers))
    if simulation.gpus_per_hospital >= 0:
        gpu_share = simulation.gpus_per_hospital
    elif gpus and device != "cpu":
        gpu_share = min(1.0, gpus / workers)
    else:
        gpu_share = 0.0
    return WorkerResources(per_hospital, gpu_share, workers)


def simulate(
    config: RunConfig,
    on_round: RoundCallback | None = None,
    verbose: bool = False,
    data_source: DataSource = simulated_data,
) -> RunResult:
    """Run a whole federated simulation; return where the results are and the per-round rows.

    `data_source` gives each simulated hospital its data (default: its share of the run's
    data; the privacy audit passes one that adds canaries)."""
    from flwr.simulation import run_simulation

    config = prepare_config(config)
    resources = plan_workers(config.simulation, config.local.device)
    results: list[RunResult] = []

    server_app = build_server_app(config, on_round=on_round, on_result=results.append)
    client_app = build_simulation_client_app(config, data_source)

    backend_config = {
        "client_resources": {
            "num_cpus": resources.cpus_per_hospital,
            "num_gpus": resources.gpus_per_hospital,
        },
        "init_args": {
            **({"address": config.simulation.ray_address} if config.simulation.ray_address else {}),
            "num_cpus": resources.workers * resources.cpus_per_hospital,
            "logging_level": "ERROR" if not verbose else "INFO",
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }
    if config.simulation.ray_address:
        del backend_config["init_args"]["num_cpus"]  # the cluster says what it has
    log.info(
        "simulating %d hospitals on %d workers", config.simulation.hospitals, resources.workers
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=config.simulation.hospitals,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    if not results:
        raise RuntimeError("the simulation ended without a result; rerun with --verbose to see why")
    return results[0]
