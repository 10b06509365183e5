"""Typed errors: one base with an OS-style domain and code per case (DESIGN.md §3).

Every refusal raises before anything is written, so callers can retry or fix
their input without cleaning up.
"""

from __future__ import annotations

APPLE_DOMAIN = "BGTaskSchedulerErrorDomain"
HARMONY_DOMAIN = "HarmonyOS"


class BackgroundTaskError(Exception):
    """Base of every bgqueue error; `code` and `domain` mirror the OS frameworks."""

    code: int = 0
    domain: str = HARMONY_DOMAIN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} ({self.domain} {self.code})"


class Unavailable(BackgroundTaskError):
    """The app may not schedule background work (for example, it is disabled)."""

    code, domain = 1, APPLE_DOMAIN


class TooManyPendingTaskRequests(BackgroundTaskError):
    """The scope already holds the maximum pending requests of this kind."""

    code, domain = 2, APPLE_DOMAIN


class NotPermitted(BackgroundTaskError):
    """The identifier is not in the app's permitted identifiers."""

    code, domain = 3, APPLE_DOMAIN


class ImmediateRunIneligible(BackgroundTaskError):
    """A continued-processing request with the FAIL strategy cannot start now."""

    code, domain = 4, APPLE_DOMAIN


class PermissionDenied(BackgroundTaskError):
    """The caller lacks the permission the call needs."""

    code = 201


class NotSystemApp(BackgroundTaskError):
    """A system API was called from an app created without `system=True`."""

    code = 202


class ParameterError(BackgroundTaskError, ValueError):
    """A bad argument: wrong type, out of range, naive datetime, non-JSON payload."""

    code = 401


class ServiceError(BackgroundTaskError):
    """The broker cannot be reached; the message names the URL without its password."""

    code = 9800004


class ContinuousTaskVerificationFailed(BackgroundTaskError):
    """Continuous task refused: undeclared mode, duplicate start or stop of nothing."""

    code = 9800005


class TransientTaskCallerVerificationFailed(BackgroundTaskError):
    """Unknown transient delay request id."""

    code = 9900001


class TransientTaskVerificationFailed(BackgroundTaskError):
    """Transient delay refused: too many at once or the daily quota is used up."""

    code = 9900002


class EfficiencyResourceVerificationFailed(BackgroundTaskError):
    """Bad efficiency resource types."""

    code = 18700001


class WorkInfoCheckFailed(BackgroundTaskError):
    """The work does not exist or is not the caller's."""

    code = 9700004


class StartWorkFailed(BackgroundTaskError):
    """The work exists, the app has its maximum works, or the interval is too short."""

    code = 9700005


# --- outcomes reported to Celery (and so to Flower) ------------------------------------------


class TaskOutcomeError(Exception):
    """Raised by a run's Celery task after the run's outcome is recorded in bgqueue's history,
    so that Celery and Flower show a run that did not succeed as FAILURE, saying what happened.

    Not a `BackgroundTaskError`: nothing was refused. `body_stopped` is True when the body
    had to be interrupted in a pool process; the worker then retires that process.
    """

    body_stopped: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TaskUnsuccessful(TaskOutcomeError):
    """The run completed unsuccessfully: `set_task_completed(success=False)`, or no
    expiration handler was set when its time ran out."""


class TaskFailed(TaskOutcomeError):
    """The launch handler raised (the message names the exception), the run was given up as
    lost, or no handler for the identifier was registered on the worker."""


class TaskExpired(TaskOutcomeError):
    """The run did not complete by its deadline and was terminated."""
