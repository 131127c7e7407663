"""One exception family per domain.

Every message names the file (and line) or the config field, says what was wrong and what to do.
The CLI turns a `FedwardError` into one readable line on stderr and exit code 2.
"""


class FedwardError(Exception):
    """Base of every error a user can cause and fix."""


class ConfigError(FedwardError):
    """A run configuration value is invalid; the message names the field."""


class DataError(FedwardError):
    """A data file is missing, unreadable or malformed; the message names the file and line."""


class ModelError(FedwardError):
    """A base model cannot be loaded, or adapter tensors do not match the run's model."""


class PolicyError(FedwardError):
    """A hospital's site policy refuses a request."""


class PrivacyBudgetExceeded(FedwardError):
    """Training would push a hospital past its privacy budget; refused before any step."""


class SecAggError(FedwardError):
    """A secure-aggregation message or stage failed; the message names the node and stage."""
