"""One exception family per domain.

Every message names the file (and line) or the config field, says what was wrong and what to do.
The CLI turns a `FedwardError` into one readable line on stderr and exit code 2.

A message is for the person who can fix it, on the machine where it happened. What a hospital
sends back to the coordinator is the error's `reason` instead (common/protocol/reasons.py): a code
from a closed set with numbers, never the message, which may name a path, a column or a record's
value.
"""

from __future__ import annotations

from fedward.common.protocol.reasons import Reason


class FedwardError(Exception):
    """Base of every error a user can cause and fix.

    `reason` is what may leave a hospital: the one given, else the family's generic code.
    """

    code = "error.internal"

    def __init__(self, *args: object, reason: Reason | None = None) -> None:
        super().__init__(*args)
        self._reason = reason

    @property
    def reason(self) -> Reason:
        return self._reason or Reason(self.code)

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self._reason))


def _rebuild(kind: type[FedwardError], args: tuple, reason: Reason | None) -> FedwardError:
    return kind(*args, reason=reason)


class ConfigError(FedwardError):
    """A run configuration value is invalid; the message names the field."""

    code = "config.invalid"


class DataError(FedwardError):
    """A data file is missing, unreadable or malformed; the message names the file and line."""

    code = "data.unreadable"


class ModelError(FedwardError):
    """A base model cannot be loaded, or adapter tensors do not match the run's model."""

    code = "model.unusable"


class PolicyError(FedwardError):
    """A hospital's site policy refuses a request."""

    code = "policy.refused"


class PrivacyBudgetExceeded(FedwardError):
    """Training would push a hospital past its privacy budget; refused before any step."""

    code = "budget.exceeded"


class SecAggError(FedwardError):
    """A secure-aggregation message or stage failed; the message names the node and stage."""

    code = "secagg.failed"
