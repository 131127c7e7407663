"""Distributed noise (issue 39), attacked the way a coordinator would.

A hospital adds only 1/t of the DP noise when its own policy trusts t honest hospitals. These
tests try to get more from it than that trust allows: asking a hospital for more trust than its
policy grants, switching it to the encoding of another run, shrinking the secure cohort below t
after the masked uploads, and colluding with t - 1 hospitals that add no noise (then the
victim's epsilon must be the weaker figure docs/privacy.md gives, not the run's target).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tiny_training

from fedward.client.app import (
    secure_round_terms,
)
from fedward.client.policy import SitePolicy
from fedward.client.privacy.accounting import (
    compose_epsilon,
    distributed_epsilon,
    plan_distributed,
)
from fedward.client.privacy.ledger import PrivacyLedger
from fedward.client.privacy.noisy_sum import noisy_gradient_sum
from fedward.client.secagg import SecAggClientSession, SecAggIdentity
from fedward.common.config import LocalRun, RunSpec
from fedward.common.errors import PolicyError, SecAggError
from fedward.common.model import build_model, get_adapter_arrays
from fedward.common.secagg import (
    ADVERTISE_KEYS,
    CONSISTENCY_CHECK,
    MASKED_UPDATE,
    SHARE_KEYS,
    UNMASK,
)
from fedward.common.secagg.distributed_noise import INTEGER, local_noise_std, sensitivity
from fedward.server.secagg import SecAggResult, SecAggServerSession

RUN = "run-39"


def distributed_spec(t: int = 3, **values) -> RunSpec:
    return RunSpec(noise="distributed", noise_hospitals=t, dp_unit="record", **values)


# --- the policy decides the trust ----------------------------------------------------------------


def test_a_coordinator_asking_more_trust_than_the_policy_grants_is_refused():
    spec = distributed_spec(t=3)
    with pytest.raises(PolicyError) as refused:
        SitePolicy.permissive().check(spec)  # trusts nobody but itself (the default)
    reason = refused.value.reason
    assert reason.code == "policy.rules"
    assert "trust_min_honest_hospitals" in reason.params["rules"]
    assert reason.params["trust_min_honest_hospitals"] == 1
    with pytest.raises(PolicyError, match="trusts at most 2"):
        SitePolicy.permissive(trust_min_honest_hospitals=2).check(spec)
    SitePolicy.permissive(trust_min_honest_hospitals=3).check(spec)  # granted: accepted
    SitePolicy.permissive(trust_min_honest_hospitals=5).check(spec)


def test_distributed_noise_needs_dp_and_secure_aggregation():
    with pytest.raises(ValueError, match="needs secure aggregation"):
        RunSpec(noise="distributed", secure_aggregation=False)
    with pytest.raises(ValueError, match="needs dp on"):
        RunSpec(noise="distributed", dp=False)
    with pytest.raises(ValueError, match="noise_hospitals"):
        RunSpec(noise_hospitals=3)  # a split of local noise means nothing


# --- the secure round holds the hospital to t ----------------------------------------------------


def federation(count: int, spec: RunSpec, site_minimum: int = 2):
    """`count` hospitals whose sessions run on the terms `secure_round_terms` gives them for
    `spec`, and the coordinator's session asking for the integer encoding."""
    ids = list(range(101, 101 + count))
    config = LocalRun(spec=spec)
    clients = {}
    for node, number in zip(ids, range(count), strict=True):
        simulated = SecAggIdentity.simulated(number, count)
        identity = SecAggIdentity(simulated.signing_key, simulated.roster, site_minimum)
        identity, encoding = secure_round_terms(identity, config.spec.privacy)
        clients[node] = SecAggClientSession(node, RUN, 1, identity, encoding)
    server = SecAggServerSession(RUN, 1, ids, 6, encoding=INTEGER)
    return ids, clients, server


def ask(clients, stage, requests, vectors=None):
    replies, refusals = {}, {}
    for node, request in requests.items():
        try:
            if stage == MASKED_UPDATE:
                replies[node] = clients[node].masked_update(request, vectors[node], 1)
            else:
                replies[node] = getattr(clients[node], stage)(request)
        except SecAggError as exc:
            refusals[node] = exc
    return replies, refusals


def run_round(count: int, spec: RunSpec, drop_after_upload: int | None = None):
    """One integer round; the coordinator may declare a hospital dropped after every masked
    update arrived. Returns (the unmasked sum or None, refusals at the consistency check)."""
    ids, clients, server = federation(count, spec)
    vectors = {node: np.arange(7, dtype=np.int64) * (k + 1) for k, node in enumerate(ids)}
    replies, _ = ask(clients, ADVERTISE_KEYS, server.advertise_keys_requests())
    replies, _ = ask(clients, SHARE_KEYS, server.share_keys_requests(replies))
    masked, _ = ask(clients, MASKED_UPDATE, server.masked_update_requests(replies), vectors)
    assert set(masked) == set(ids)
    if drop_after_upload is not None:
        masked.pop(ids[drop_after_upload])
    signed, refusals = ask(clients, CONSISTENCY_CHECK, server.consistency_requests(masked))
    try:
        revealed, _ = ask(clients, UNMASK, server.unmask_requests(signed))
        result = server.aggregate(revealed)
    except SecAggError:
        return None, refusals
    return result.integer_sum.view(np.int64), refusals


def test_an_integer_round_unmasks_the_exact_signed_sum():
    total, refusals = run_round(3, distributed_spec(t=3))
    assert not refusals
    np.testing.assert_array_equal(total, np.arange(7) * 6)


def test_a_cohort_shrunk_below_t_after_the_upload_is_refused():
    # Site minimum 2: only t holds the hospitals to three.
    total, refusals = run_round(3, distributed_spec(t=3), drop_after_upload=2)
    assert total is None
    assert len(refusals) == 2
    for exc in refusals.values():
        assert exc.reason.code == "secagg.cohort_too_small"
    # Without the rule (t = 1, the same site minimum) the two survivors would be unmasked.
    total, refusals = run_round(3, distributed_spec(t=1), drop_after_upload=2)
    assert not refusals
    np.testing.assert_array_equal(total, np.arange(7) * 3)


def test_the_coordinator_cannot_switch_a_hospital_to_another_encoding():
    ids, clients, _ = federation(3, distributed_spec(t=3))
    weighted = SecAggServerSession(RUN, 1, ids, 6)  # FedAvg's encoding, at 16-bit moduli
    with pytest.raises(SecAggError, match="encoding"):
        clients[ids[0]].advertise_keys(weighted.advertise_keys_requests()[ids[0]])


# --- colluders who add no noise ------------------------------------------------------------------


@pytest.fixture(scope="module")
def victim(tiny_model_dir):
    """A hospital's real distributed-noise vector on a tiny model, with the noise it adds."""
    spec = distributed_spec(t=3, model=tiny_model_dir, labels=tiny_training.LABELS, rounds=10)
    config = LocalRun(spec=spec, local={"device": "cpu"})
    tokenizer = tiny_training.tokenizer(tiny_model_dir)
    dataset = tiny_training.data(tiny_training.config(tiny_model_dir), tokenizer, count=30)
    model = build_model(spec, len(tiny_training.LABELS))
    start = get_adapter_arrays(model)
    return config, model, dataset, start, tokenizer.pad_token_id


def test_with_t_minus_one_colluders_the_victim_gets_the_documented_epsilon_and_no_better(victim):
    config, model, dataset, start, pad = victim
    spec = config.spec
    plan = plan_distributed(spec.privacy, spec.federation.rounds)
    # The colluders hand the coordinator their vectors and add no noise: what is left of the sum
    # is the victim's own vector. Its noise is measured against the noiseless signal, taken
    # with the same seed (the same sample and rounding) minus the noise draws.
    noisy, _, _ = noisy_gradient_sum(model, dataset, config, start, pad, "victim", noise_seed=5)
    residuals = []
    for seed in range(6, 14):
        other, _, _ = noisy_gradient_sum(model, dataset, config, start, pad, "v", noise_seed=seed)
        residuals.append((other - noisy).astype(np.float64))
    # Two independent vectors of the same signal differ by two noise draws (and rounding).
    std = float(np.std(np.concatenate(residuals))) / math.sqrt(2)
    dimension = noisy.size - 1
    measured_multiplier = std / sensitivity(dimension)
    measured = compose_epsilon(
        [(measured_multiplier, plan.sample_rate, spec.federation.rounds)], spec.privacy.delta
    )
    documented = distributed_epsilon(spec.privacy, spec.federation.rounds, honest=1)
    assert measured == pytest.approx(documented, rel=0.05)
    assert documented > 1.5 * spec.privacy.target_epsilon  # the target would overstate it
    # With t honest hospitals the sum's noise is the plan's: the run's target.
    assert distributed_epsilon(spec.privacy, spec.federation.rounds, honest=3) == pytest.approx(
        spec.privacy.target_epsilon, 0.01
    )
    assert measured_multiplier * math.sqrt(3) == pytest.approx(plan.noise_multiplier, rel=0.03)


# --- deployed hospitals: real handlers, policy, ledger and audit log -----------------------------


def _deployed_round(config, hospitals: dict) -> SecAggResult:
    """One distributed-noise round over the deployed hospitals, the coordinator asking for the
    integer encoding."""
    from site_fixtures import deployed_secure_round

    return deployed_secure_round(config, hospitals, RUN, 1, encoding=INTEGER)


@pytest.fixture
def trusting_hospitals(tmp_path, tiny_model_dir):
    """Three deployed hospitals whose policies trust three honest hospitals."""
    from site_fixtures import hospital_node_config, run_config, write_notes, write_policy

    from fedward.client.secagg import write_signing_key

    nodes = (1, 2, 3)
    keys = {node: write_signing_key(tmp_path / f"key-{node}.pem") for node in nodes}
    roster = "".join(f'hospital-{node} = "{key}"\n' for node, key in keys.items())
    hospitals = {}
    for node in nodes:
        folder = tmp_path / f"hospital-{node}"
        folder.mkdir()
        write_notes(folder / "notes.csv", marker=f"h{node}-")
        write_policy(
            folder / "policy.toml",
            lifetime_epsilon=20.0,
            require_secure_aggregation=True,
            secagg_signing_key=str(tmp_path / f"key-{node}.pem"),
            min_secure_aggregation_hospitals=2,
            trust_min_honest_hospitals=3,
        )
        with (folder / "policy.toml").open("a", encoding="utf-8") as policy:
            policy.write(f"[secagg_roster]\n{roster}")
        node_config = hospital_node_config(folder / "notes.csv", folder / "policy.toml", folder)
        hospitals[node] = {**node_config, "hospital-name": f"hospital-{node}"}
    config = run_config(tiny_model_dir, rounds=2).updated(
        secure_aggregation=True, noise="distributed", noise_hospitals=3, dp_unit="record"
    )
    return config, hospitals


@pytest.mark.usefixtures("inside_a_flower_app")
def test_deployed_hospitals_charge_the_plan_and_audit_the_epsilon_if_alone(trusting_hospitals):
    config, hospitals = trusting_hospitals
    result = _deployed_round(config, hospitals)
    assert sorted(result.included) == [1, 2, 3] and result.integer_sum is not None
    plan = plan_distributed(config.spec.privacy, config.spec.federation.rounds)
    for node_config in hospitals.values():
        lines = Path(node_config["audit-log"]).read_text(encoding="utf-8").splitlines()
        train = [json.loads(line)["fields"] for line in lines if '"train"' in line][-1]
        charged = compose_epsilon([plan.as_history_entry()], config.spec.privacy.delta)
        assert train["epsilon_run"] == pytest.approx(charged)
        assert train["noise"] == "distributed" and train["noise_hospitals"] == 3
        assert train["epsilon_run_if_alone"] == pytest.approx(
            distributed_epsilon(
                config.spec.privacy, config.spec.federation.rounds, honest=1, rounds=1
            )
        )
        assert train["epsilon_run_if_alone"] > train["epsilon_run"]
        ledger = PrivacyLedger.open(node_config["ledger"], node_config["dataset-id"])
        assert ledger.rounds_recorded(RUN) == [1]


@pytest.mark.usefixtures("inside_a_flower_app")
def test_a_repeated_distributed_round_resends_the_same_noisy_sum_and_spends_nothing(
    trusting_hospitals,
):
    """Noise drawn again for the same round would be a second release of the same gradients;
    the kept vector is resent instead, and the unmasked sum is the same."""
    config, hospitals = trusting_hospitals
    first = _deployed_round(config, hospitals)
    again = _deployed_round(config, hospitals)
    np.testing.assert_array_equal(first.integer_sum, again.integer_sum)
    for node_config in hospitals.values():
        ledger = PrivacyLedger.open(node_config["ledger"], node_config["dataset-id"])
        assert ledger.rounds_recorded(RUN) == [1]


def test_only_a_simulations_colluders_skip_their_share(victim):
    """`colluding_hospitals` (privacy audits) makes the last simulated hospitals add no noise;
    the same vector drawn twice then differs by the rounding alone. A hospital's `LocalRun`
    (what a deployed hospital holds) has no such setting, so nothing a coordinator sends can
    switch off its share."""
    from fedward.common.config import RunConfig

    config, model, dataset, start, pad = victim
    simulated = RunConfig(**{**config.flat(), "hospitals": 3, "colluding_hospitals": 1})

    def spread(who: str, run) -> float:
        first, _, _ = noisy_gradient_sum(model, dataset, run, start, pad, who, noise_seed=1)
        again, _, _ = noisy_gradient_sum(model, dataset, run, start, pad, who, noise_seed=2)
        return float(np.std((first - again).astype(np.float64))) / math.sqrt(2)

    # One share's standard deviation; what two draws of a colluder differ by is the rounding
    # and the model's dropout, far below it.
    dimension = sum(a.size for a in start.values())
    plan = plan_distributed(config.spec.privacy, config.spec.federation.rounds)
    share = local_noise_std(plan.noise_multiplier, dimension, 3)
    assert spread("hospital-2", simulated) < 0.2 * share  # the colluder: no noise
    assert spread("hospital-0", simulated) == pytest.approx(share, rel=0.1)  # an honest one
    assert spread("hospital-2", config) == pytest.approx(share, rel=0.1)  # a deployed LocalRun
