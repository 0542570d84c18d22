"""Typed errors. Every user-facing failure is one of these, so the CLI can print one line and pick an exit code.

A message says what was wrong; a hint says what to do. User errors (bad input, unknown target, infeasible budget)
exit with code 2; anything else that is still ours exits with code 1.
"""
from __future__ import annotations

import difflib
from typing import Iterable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INCONCLUSIVE = 3  # a comparison too noisy to judge, or a predicted band straddling the budget
EXIT_MISSED = 4  # deploy compress: the budget was missed (the model and report are still written)


class DeployError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            text += f"; {self.hint.rstrip('.')}"
        return text if text.endswith(("?", "!")) else text + "."

    def __str__(self) -> str:
        return self.one_line()


class UserInputError(DeployError):
    """The user gave us something we cannot use (exit 2)."""

    exit_code = EXIT_USAGE


class ModelLoadError(UserInputError):
    """A model file is missing, corrupt, of an unknown kind, or needs a flag to be loaded."""


class InputSpecError(UserInputError):
    """An input shape/dtype is malformed or does not fit the model."""


class DataError(UserInputError):
    """Calibration or evaluation data cannot be read or does not fit the model."""


class UnknownTargetError(UserInputError):
    """A target name matches no profile."""


class ProfileError(UserInputError):
    """A profile file is invalid."""


class ConfigError(UserInputError):
    """A pass config or pipeline config is invalid."""


class BudgetInfeasibleError(UserInputError):
    """No plan meets the budget; the message names the least achievable cost."""

    def __init__(self, message: str, hint: str | None = None, least_achievable: float | None = None):
        super().__init__(message, hint)
        self.least_achievable = least_achievable


class OutputExistsError(UserInputError):
    """The output path exists and --force was not given."""


class RuntimeUnavailableError(DeployError):
    """A runtime (TensorRT, a GPU, a remote device) is not available here."""

    exit_code = EXIT_USAGE


class MeasurementError(DeployError):
    """A measurement could not be made or is not trustworthy."""


def nearest(name: str, choices: Iterable[str]) -> str | None:
    """The closest known name, for 'did you mean' hints."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None
