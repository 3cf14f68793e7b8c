"""Credentials in tracking URIs: used to connect, never written or printed.

A tracking URI may carry secrets: a password in its user-info
(``http://alice:s3cret@host:5000``, ``postgresql://u:pw@db/mlflow``) or a token in its
query (``?token=...``). Everything this project stores or shows (the saved experiment
spec, Ray Tune's ``tuner.pkl``, MLflow params and tags, messages, tracebacks) carries
the **public** form instead: the URI without the password or the secret query values
(:func:`public_uri`).

How the secret still reaches the store, only in this process:

* HTTP(S) stores: the user-info becomes MLflow's own ``MLFLOW_TRACKING_USERNAME`` and
  ``MLFLOW_TRACKING_PASSWORD`` (for this process), so MLflow never sees the password in
  a URL (its error messages quote the URL). Those variables may also be set by the user
  instead, or ``MLFLOW_TRACKING_TOKEN`` for a bearer token; a resumed run needs them
  (or the URI given again), since the saved spec holds only the public URI.
* other stores (SQLAlchemy URIs): the full URI is kept in memory, mapped from its public
  form (:func:`connection_uri`), and handed to MLflow's client only.

Every secret seen is also registered for :func:`scrub`, and :func:`scrubbed_output`
replaces it with ``***`` in anything written to stdout/stderr (tracebacks, warnings,
Ray's forwarded worker output).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from typing import Any, TextIO
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlparse

MASK = "***"
#: Query parameters whose values are secrets.
_SECRET_QUERY = re.compile(r"token|passw|secret|key|auth|sig|credential", re.IGNORECASE)
_ENV_USER, _ENV_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"

_SECRETS: set[str] = set()  # every secret seen in this process, for scrub()
_CONNECTIONS: dict[str, str] = {}  # public URI -> the URI to connect with


def _secrets(uri: str) -> list[str]:
    parsed = urlparse(uri)
    found = []
    if parsed.password:
        found += [parsed.password, unquote(parsed.password)]
    for key, value in parse_qsl(parsed.query, keep_blank_values=True):
        if value and _SECRET_QUERY.search(key):
            found += [value, quote(value, safe="")]
    return [s for s in found if s]


def public_uri(uri: str) -> str:
    """``uri`` without its password and secret query values (safe to store and print).

    ``http://alice:s3cret@h:5000`` -> ``http://h:5000`` (MLflow takes HTTP credentials
    from its variables), ``postgresql://u:pw@db/m`` -> ``postgresql://u@db/m``; a
    ``token=...`` query value becomes ``***``. A URI without secrets comes back as it is.
    """
    parsed = urlparse(uri)
    netloc = parsed.netloc
    if parsed.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        keep_user = parsed.scheme not in ("http", "https")
        netloc = f"{userinfo.split(':', 1)[0]}@{host}" if keep_user else host
    query = parsed.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(v and _SECRET_QUERY.search(k) for k, v in pairs):
            query = urlencode(
                [(k, MASK if v and _SECRET_QUERY.search(k) else v) for k, v in pairs],
                safe="*",
            )
    if netloc == parsed.netloc and query == parsed.query:
        return uri
    return parsed._replace(netloc=netloc, query=query).geturl()


def register_secrets(uri: str) -> None:
    """Remember ``uri``'s secrets for :func:`scrub` (before anything may print them)."""
    _SECRETS.update(_secrets(uri))


def register(uri: str) -> str:
    """Remember ``uri``'s secrets (for :func:`scrub`) and how to connect; its public form.

    For an HTTP(S) URI with a password, MLflow's username and password variables are set
    for this process; set already to other values, that is an error naming both
    (``ValueError``), never a silent choice.
    """
    public = public_uri(uri)
    register_secrets(uri)
    if public == uri:
        return uri
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https") and parsed.password is not None:
        user, password = unquote(parsed.username or ""), unquote(parsed.password)
        for name, value in ((_ENV_USER, user), (_ENV_PASSWORD, password)):
            have = os.environ.get(name)
            if have is not None and have != value:
                raise ValueError(
                    f"the tracking URI {public} carries credentials that differ from "
                    f"${name}; give them one way (the variables are the safer one)."
                )
        os.environ[_ENV_USER], os.environ[_ENV_PASSWORD] = user, password
        # MLflow takes the credentials from the variables: the URL it quotes in its
        # messages (the public one) has none.
        _CONNECTIONS[public] = public
    else:
        _CONNECTIONS[public] = uri
    return public


def connection_uri(uri: str) -> str:
    """The URI to hand MLflow's client for ``uri`` (its public or its full form)."""
    return _CONNECTIONS.get(uri, _CONNECTIONS.get(public_uri(uri), uri))


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced by ``***``."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class _Scrubbing:
    """A text stream that scrubs secrets from what it forwards to ``target``.

    Everything but ``write`` (encoding, ``fileno``, ``isatty``, ...) is the target's.
    """

    def __init__(self, target: TextIO) -> None:
        self.target = target

    def write(self, text: str) -> int:
        self.target.write(scrub(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


@contextlib.contextmanager
def scrubbed_output() -> Iterator[None]:
    """Within the block, stdout and stderr of this process never show a secret."""
    saved = sys.stdout, sys.stderr
    if isinstance(sys.stdout, _Scrubbing):  # nested: already scrubbing
        yield
        return
    sys.stdout, sys.stderr = _Scrubbing(sys.stdout), _Scrubbing(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


__all__ = [
    "connection_uri",
    "public_uri",
    "register",
    "register_secrets",
    "scrub",
    "scrubbed_output",
]
