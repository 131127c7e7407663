"""What a hospital may say about a refusal or an error: a code from a closed set, with numbers.

A hospital's refusal travels to the coordinator, which stores it in history.json and its audit
log. An exception's text is made for the hospital's staff: it may name a file path, a column, a
label or a value taken from a record, and a dishonest coordinator can craft requests that make
such text carry patient data out (five notes a request, through "labels [...] are not in the
run's label set"). So the text never travels. What does is a `Reason`: a code from `REASONS`
and parameters that are finite numbers (counts, limits, round numbers) or rule names from
`RULES`. The coordinator renders it with the template below; the hospital's own log and audit
log keep the full text for its staff.

Both sides validate: the hospital builds only valid reasons (`Reason` raises on anything else),
and the coordinator turns a reply it cannot validate into `reason.unknown`, never into text.
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass, field
from typing import Any

#: code -> the message the coordinator renders; `{name}` is filled from the parameters.
REASONS: dict[str, str] = {
    # site policy
    "policy.not_configured": "the hospital is not set up for deployment "
    "(it must be started with `fedward client start`)",
    "policy.file_invalid": "the hospital's site policy file cannot be used; every request is "
    "refused until its staff fix it",
    "policy.schema_invalid": "the hospital's data schema is invalid; its staff must fix it",
    "dataset.recorded_elsewhere": "the hospital's data set is recorded under another data-set "
    "id; its staff must start it with that id; refused, nothing spent",
    "policy.refused": "the site policy refuses the request",
    "policy.rules": "the site policy refuses the run (rules broken: {rules})",
    "policy.too_few_examples": "fewer local training examples than the site policy's minimum "
    "of {min_examples}",
    # privacy budget
    "budget.exceeded": "the hospital's privacy budget would be exceeded; nothing was released",
    # data
    "data.unreadable": "the hospital cannot read its data with its data schema (details in the "
    "hospital's own log)",
    # A data-dependent refusal carries no number derived from the data (issue 28): it comes
    # after the hospital's budget gate and is charged (client/site/gates.py).
    "data.labels_mismatch": "label values in the hospital's data are not in the run's labels; "
    "the hospital's staff must map them (or declare the site's labels in its policy), or the "
    "run list them; the round was charged",
    # model, configuration, secure aggregation
    "data.no_patient": "the run asks patient-level DP but the hospital's data name no patient "
    "for a record; its staff must name the patient column",
    "policy.no_patient_column": "the run asks patient-level DP but the hospital's data schema "
    "names no patient column; refused, nothing spent",
    "ledger.unit_mixed": "the hospital's data set has spent its budget in the other DP unit "
    "(record or patient); units are never mixed in one budget; refused, nothing spent",
    "evaluation.patient_unit": "evaluation refused: released metrics are protected per record, "
    "and this run's unit is the patient",
    "data.vocabulary": "the base model's tokenizer maps more of the hospital's text to its unknown "
    "token than the run's limit {max_unknown_rate}; use a model whose vocabulary covers the "
    "text (e.g. a Chinese BERT for Chinese notes)",
    "model.unusable": "the base model or the adapter tensors cannot be used at this hospital",
    "model.start_mismatch": "the first round's adapter is not the starting adapter the hospital "
    "pinned (init_adapter, as built from its own copy); refused before any record was read",
    "config.invalid": "the run spec received is invalid",
    "run.spec_changed": "the run spec differs from the one this hospital fixed for the run on "
    "first contact; refused, nothing spent",
    "run.evaluate_only": "the run evaluated its starting adapter alone at this hospital (an "
    "evaluate-only run), so it trains nothing there; refused, nothing spent",
    "secagg.failed": "secure aggregation failed at this hospital",
    "secagg.cohort_too_small": "secure aggregation refused: only {hospitals} hospital(s), this "
    "one included, would be unmasked together, fewer than the site policy's "
    "min_secure_aggregation_hospitals ({min_secure_aggregation_hospitals}); the hospital "
    "revealed nothing more",
    # evaluation (an accounted release, see client/site/gates.py)
    "evaluation.not_allowed": "the site policy does not release evaluation metrics",
    "evaluation.round_out_of_range": "evaluation refused: round {round} is outside 1..{rounds}",
    "evaluation.round_not_trained": "evaluation refused: this hospital did not train round {round}",
    "evaluation.not_final": "evaluation refused: the site policy releases metrics only for the "
    "final round ({rounds})",
    "evaluation.repeated": "evaluation refused: round {round} was already evaluated (at most "
    "once a round)",
    "evaluation.start_not_allowed": "evaluation refused: the site policy does not answer "
    "evaluate-only runs (evaluate_starting_adapter)",
    "evaluation.budget": "evaluation refused: releasing noised metrics would exceed the "
    "hospital's privacy budget",
    # anything else
    "round.out_of_range": "round {round} is outside the run's rounds 1..{rounds}; refused, "
    "nothing spent",
    "round.backwards": "round {round} comes after a later round of the same run on this data set "
    "(rounds never go backwards); refused, nothing spent",
    "round.repeated": "round {round} was already trained on this data set, or is being trained "
    "(a round is trained at most once); refused",
    "identifier.invalid": "an identifier sent by the coordinator (such as the run id) is not a "
    "plain name; refused before any file was touched",
    "secagg.weight_too_large": "the hospital's training examples exceed the run's "
    "secagg_max_weight ({max_weight}); refused before any step, nothing spent",
    "error.internal": "the hospital hit an unexpected error (details in its own log)",
    "reason.unknown": "the hospital's reply carried a reason this coordinator cannot read",
}

#: Rule names a parameter may carry: the site policy's fields, nothing else.
RULES = frozenset(
    {
        "allowed_models",
        "allowed_model_hashes",
        "allowed_adapter_hashes",
        "allowed_tasks",
        "require_dp",
        "lifetime_epsilon",
        "max_delta",
        "max_rounds",
        "require_secure_aggregation",
        "approved_run_configs",
        "min_examples",
        "allow_evaluation",
        "evaluation_epsilon",
        "evaluate_rounds",
        "evaluate_starting_adapter",
        "labels",
        "dp_unit",
        "trust_min_honest_hospitals",
    }
)

#: Parameter names, also a closed set (a name is text that travels too).
PARAMS = frozenset(
    {
        "rules",
        "round",
        "rounds",
        "min_examples",
        "lifetime_epsilon",
        "max_delta",
        "max_rounds",
        "epsilon",
        "max_weight",
        "max_unknown_rate",
        "hospitals",
        "min_secure_aggregation_hospitals",
        "trust_min_honest_hospitals",
    }
)


@dataclass(frozen=True)
class Reason:
    """A code from `REASONS` and its parameters; raises `ValueError` on anything else."""

    code: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.code not in REASONS:
            raise ValueError(f"unknown reason code {self.code!r}")
        missing = _placeholders(REASONS[self.code]) - set(self.params)
        if missing:
            raise ValueError(f"reason {self.code}: parameters {sorted(missing)} are required")
        for name, value in self.params.items():
            if name not in PARAMS:
                raise ValueError(f"reason {self.code}: unknown parameter {name!r}")
            if not _valid_value(value):
                raise ValueError(
                    f"reason {self.code}: parameter {name!r} must be a finite number or rule "
                    "names from the closed set"
                )

    def render(self) -> str:
        """The coordinator's line: the template filled in, extra parameters after it."""
        template = REASONS[self.code]
        shown = {name: _show(value) for name, value in self.params.items()}
        text = template.format(**shown)
        named = _placeholders(template)
        extra = [f"{name} {shown[name]}" for name in self.params if name not in named]
        if extra:
            text += f" ({', '.join(extra)})"
        return f"{text} [{self.code}]"

    def to_record(self) -> dict[str, str]:
        """The form that travels (a Flower ConfigRecord's values)."""
        return {"code": self.code, "params": json.dumps(self.params, sort_keys=True)}

    @classmethod
    def from_record(cls, record: Any) -> Reason:
        """A received reason, validated; anything that is not one becomes `reason.unknown`."""
        try:
            params = json.loads(str(record["params"])) if "params" in record else {}
            if not isinstance(params, dict):
                raise ValueError("params must be an object")
            return cls(str(record["code"]), params)
        except (KeyError, TypeError, ValueError):
            return cls("reason.unknown")


def _placeholders(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _valid_value(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return bool(value) and all(part in RULES for part in value.split(","))
    return False


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value.replace(",", ", ")
    return str(value)
