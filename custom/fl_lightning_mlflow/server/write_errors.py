"""How the MLflow write path tells a failure worth retrying from a refusal for good.

MLflow raises MlflowException with an error_code for what its server or store refused; network
trouble surfaces as OSError or requests' errors. The write queue retries the first kind with
backoff and isolates the second (the item goes to the dead letter), so one bad request never
holds up the rest.
"""

from mlflow.exceptions import MlflowException

try:  # MLflow's HTTP client is requests; its errors are network trouble, worth retrying
    from requests import RequestException
except ImportError:  # pragma: no cover - requests ships with mlflow
    RequestException = OSError

# MLflow error codes that mean "this request will never be accepted as it is". Everything else
# MLflow raises (INTERNAL_ERROR - also what a failed connection becomes -, TEMPORARILY_UNAVAILABLE,
# DEADLINE_EXCEEDED, REQUEST_LIMIT_EXCEEDED/RESOURCE_EXHAUSTED (429), ABORTED/RESOURCE_CONFLICT
# (409), UNAUTHENTICATED/PERMISSION_DENIED (401/403: the start probe handles refused
# credentials), ENDPOINT_NOT_FOUND (a proxy's 404, not about the item)...) is retried.
REFUSED_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",  # changed param value, bad name/value, run not active (deleted)
        "RESOURCE_DOES_NOT_EXIST",  # run or experiment missing
        "RESOURCE_ALREADY_EXISTS",
        "BAD_REQUEST",  # also what the SQL store makes of a database integrity error
        "MALFORMED_REQUEST",
        "INVALID_STATE_TRANSITION",
        "RESOURCE_LIMIT_EXCEEDED",
        "MAX_LIST_SIZE_EXCEEDED",
        "MAX_BLOCK_SIZE_EXCEEDED",
        "QUOTA_EXCEEDED",
        "FEATURE_DISABLED",
        "NOT_IMPLEMENTED",
    }
)


class Refused(Exception):
    """Raised where the write path itself knows a request can never succeed (e.g. its run is gone)."""


class RunNotReady(RuntimeError):
    """Points for a run whose creating action has not succeeded yet: always worth waiting for."""


def refusal(error: BaseException) -> str | None:
    """MLflow's reason when `error` refuses the request for good; None when it is worth retrying,
    "?" when the type says nothing either way (retried a few times, then isolated)."""
    if isinstance(error, Refused):
        return str(error)
    if isinstance(error, MlflowException):
        code = getattr(error, "error_code", "")
        if code in REFUSED_CODES:
            message = str(getattr(error, "message", error))
            return f"{code}: {message.removeprefix(f'{code}: ')}"  # a REST error's message repeats the code
        return None
    if isinstance(error, (RunNotReady, OSError, RequestException)):  # OSError: connection, timeout, disk
        return None
    if isinstance(error, (ValueError, TypeError)):  # an item that cannot be made into a request
        return f"{type(error).__name__}: {error}"
    return "?"
