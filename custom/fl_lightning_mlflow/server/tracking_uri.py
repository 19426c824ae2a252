"""The tracking URI: what MLflow accepts, how it is shown, and whether the server lets us in.

check_tracking_uri and redact_uri are plain string checks. probe_tracking_server asks the
server once, through MLflow's own client (so it sends exactly the credentials and TLS settings
MLflow will use for the writes), with MLflow's HTTP retries off and a short timeout so a
missing server costs about a second, not MLflow's default retry window of minutes.
"""

import contextlib
import http
import os
import re
import threading

SUPPORTED_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
USERINFO = re.compile(r"(?<=://)[^/@\s]*@")  # the user:password@ part of a URI
ERRNO = re.compile(r"\[Errno -?\d+\][^'\")]*")
RETRIED_STATUS = re.compile(r"too many (\d{3}) error responses")
_env_lock = threading.Lock()  # the probe sets MLflow's HTTP settings in os.environ for one call


class TrackingConfigError(ValueError):
    pass


def redact_uri(text: str) -> str:
    """The URI (or any message holding one) without a user:password@ part."""
    return USERINFO.sub("***@", str(text))


def check_tracking_uri(uri: str) -> str:
    """The URI if MLflow can track to it, else TrackingConfigError with one line saying why."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if ":" in uri else ""
    shown = redact_uri(uri)
    if uri.startswith("file:") or scheme == "":
        raise TrackingConfigError(
            f"tracking_uri {shown!r}: MLflow >= 3.13 refuses file stores; use sqlite:////abs/path/mlflow.db "
            "or http://host:port"
        )
    if scheme not in SUPPORTED_SCHEMES:
        raise TrackingConfigError(
            f"tracking_uri {shown!r}: unsupported scheme {scheme!r}, expected {SUPPORTED_SCHEMES}"
        )
    return uri


def _network_error(error: BaseException):
    """The requests/urllib3/OS error behind an MLflow exception, if the request never got an answer."""
    import requests

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (requests.exceptions.RequestException, OSError)):
            return error
        error = error.__cause__ or error.__context__
    return None


# The start of the body of MLflow's 403 for a Host header it does not accept (INVALID_HOST_MSG in
# mlflow.server.security_utils, whose import costs the FL server 2 s of Flask).
INVALID_HOST = "Invalid Host header"
CREDENTIALS_ADVICE = (
    "; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the FL server's "
    "environment"
)


def probe_tracking_server(uri: str, timeout: float = 3.0) -> tuple:
    """One quick request to an MLflow server: ("ok" | "refused" | "unreachable", detail).

    "refused": HTTP 401/403 (retrying cannot help); "unreachable": no HTTP answer at all
    (connection, DNS, TLS, timeout); any other HTTP error is the server's problem, which the
    write queue's retries may outlive, so "ok". The detail never holds a credential.
    """
    return _probe(uri, timeout)[:2]


def _probe(uri: str, timeout: float = 3.0) -> tuple:
    """probe_tracking_server's answer, with the advice that goes with a refusal ("" otherwise)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout)))}
    with temporary_env(settings):
        try:
            MlflowClient(uri).search_experiments(max_results=1)
            return "ok", "", ""
        except MlflowException as e:
            return _verdict(e)
        except Exception as e:  # noqa: BLE001 - anything else (bad URL, TLS setup): no verdict on credentials
            return "unreachable", redact_uri(f"{type(e).__name__}: {str(e)[:200]}"), ""


@contextlib.contextmanager
def temporary_env(settings: dict):
    """os.environ with settings added for the block (MLflow's client reads its settings and
    credentials from there), restored afterwards; one block at a time in this process."""
    with _env_lock:
        saved = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _status_text(code: int) -> str:
    try:
        return f"HTTP {code} {http.HTTPStatus(code).phrase}"
    except ValueError:
        return f"HTTP {code}"


def _verdict(error) -> tuple:
    network = _network_error(error)
    if network is not None:
        # A status MLflow retries (429, 5xx) ends as a "retry" error: no MLflow behind the address.
        retried = RETRIED_STATUS.search(str(network))
        if retried:
            return "unreachable", _status_text(int(retried.group(1))), ""
        found = ERRNO.search(str(network))
        text = found.group(0).strip() if found else str(network)[:200]
        return "unreachable", redact_uri(f"{type(network).__name__}: {text}"), ""
    # MLflow's status: the HTTP one, or the one its JSON error body names (UNAUTHENTICATED: 401).
    code = error.get_http_status_code()
    if code == 403 and INVALID_HOST in str(error):
        # MLflow's server refuses a Host header it does not know (its DNS-rebinding guard): the
        # credentials were never looked at.
        detail = (
            f"{_status_text(code)}: the server does not accept the host name it was reached by; "
            "start it with --allowed-hosts (or MLFLOW_SERVER_ALLOWED_HOSTS) naming that host"
        )
        return "refused", detail, ""
    if code in (401, 403):
        # what MLflow's client sends: basic auth with both set, else a bearer token
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
        sent = bool((user and password) or os.environ.get("MLFLOW_TRACKING_TOKEN"))
        given = "the credentials were refused" if sent else "no credentials were set"
        return "refused", f"{_status_text(code)}: {given}", CREDENTIALS_ADVICE
    return "ok", _status_text(code), ""


def check_server(uri: str) -> tuple:
    """Before the job trains: ("ok" | "refused" | "unreachable", the line to log). Refused
    credentials must stop the job (retrying cannot help); an unreachable server must not (the
    write queue keeps the data and retries). Only http(s) URIs have a server to ask."""
    if not uri.startswith(("http://", "https://")):
        return "ok", ""
    shown = redact_uri(uri)
    verdict, detail, advice = _probe(uri)
    if verdict == "refused":
        return verdict, (
            f"MLflow tracking server {shown} refused the FL server ({detail}){advice}. "
            "Stopping the job before training: nothing could be tracked"
        )
    if verdict == "unreachable":
        return (
            verdict,
            f"MLflow tracking server {shown} unreachable ({detail}); training goes on, data is kept and retried",
        )
    return verdict, ""
