"""Who may read what on the HTTP endpoint: credentials files, the password gate and the
failure limiter. Which role each route needs is :mod:`d2r_http.routes`' table.

=============  ===============================================================================
role           routes
=============  ===============================================================================
(none)         ``/healthz``, ``/readyz``: always open, they say nothing about patients
``metrics``    ``/metrics``
``viewer``     the status page: ``/``, ``/studies/<uid>``, its preview images
``ingest``     ``/dicom-web/studies[/<uid>]`` (the STOW-RS receiver)
``feedback``   ``POST /fhir/DiagnosticReport`` (signed reports from the RIS, :mod:`feedback.fhir`)
=============  ===============================================================================

Any other path needs some credential (then answers 404), so an anonymous client learns nothing.
Credentials, checked in this order:

* ``Authorization: Bearer <token>`` against the tokens file (``D2R_HTTP_TOKENS_FILE``): lines
  ``NAME ROLE[,ROLE...] TOKEN``, where TOKEN is the token itself or ``sha256:<hex digest>``.
* ``Authorization: Basic ...`` against the users file (``D2R_HTTP_USERS_FILE``): lines
  ``NAME:ROLE[,ROLE...]:scrypt$...`` written by ``d2r http-user`` (:func:`hash_password`).
* The user header of a trusted reverse proxy (``D2R_HTTP_PROXY_HEADER``), taken only from a peer
  address in ``D2R_HTTP_TRUSTED_PROXIES``; such a user gets ``D2R_HTTP_PROXY_ROLES``.
* On HTTPS with ``D2R_HTTP_TLS_CA``, a TLS client certificate the handshake verified against
  that CA: its subject holds the ``ingest`` role only (a sender posting STOW-RS).

Both files are re-read when they change. Password hashing (scrypt, 16 MiB each) runs at most
``max_hashing`` at a time; a request beyond that is answered 503 without hashing. A wrong
credential counts against the client's address (IPv6 grouped by /64) and against a budget shared
by all clients; over either, password checks are refused with 429 before any hashing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2r_core.config import refuse_placeholder_lines
from d2r_http.routes import ANY_ROLE, ROLES

__all__ = [
    "ROLES",
    "Authenticator",
    "Decision",
    "FailureLimiter",
    "Principal",
    "hash_password",
    "is_loopback",
    "parse_roles",
    "read_tokens",
    "read_users",
    "verify_password",
]

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the endpoint on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# scrypt cost: 16 MiB and ~50 ms per hash (Python's documented interactive-login parameters).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def parse_roles(text: str) -> frozenset[str]:
    """``"metrics,viewer"`` -> the roles; raises ValueError naming an unknown one."""
    roles = frozenset(r.strip() for r in text.split(",") if r.strip())
    if not roles:
        raise ValueError(f"no role given ({', '.join(ROLES)})")
    if unknown := sorted(roles - set(ROLES)):
        raise ValueError(f"unknown role {', '.join(unknown)} (roles: {', '.join(ROLES)})")
    return roles


# ----------------------------------------------------------------------------- passwords
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$<salt>$<key>`` (base64) of ``password`` with a fresh random salt."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(
        password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches an :func:`hash_password` string (constant-time compare)."""
    try:
        scheme, n, r, p, salt, key = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key, validate=True)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt, validate=True),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=256 * 1024 * 1024,
        )
    except (ValueError, binascii.Error):
        return False
    return hmac.compare_digest(got, expected)


_dummy_lock = threading.Lock()
_dummy: list[str] = []


def _dummy_hash() -> str:
    """A hash of a random password, to check unknown users against (made once, under a lock:
    a burst of first requests must not run one scrypt each)."""
    with _dummy_lock:
        if not _dummy:
            _dummy.append(hash_password(secrets.token_urlsafe(16)))
        return _dummy[0]


# ------------------------------------------------------------------------------ files
@dataclass(frozen=True)
class Principal:
    """An authenticated client: its name, its roles and how it proved them."""

    name: str
    roles: frozenset[str]
    method: str  # token, basic, proxy, certificate or local


def _token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def read_tokens(path: Path) -> dict[bytes, Principal]:
    """The tokens file: SHA-256 of each token -> its principal. Raises ValueError with the line
    (a line that still holds the examples' ``CHANGE-ME`` placeholder included)."""
    found: dict[bytes, Principal] = {}
    text = refuse_placeholder_lines(
        path.read_text(encoding="utf-8"), "D2R_HTTP_TOKENS_FILE", str(path)
    )
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"{path}:{number}: expected NAME ROLES TOKEN")
        name, roles, token = parts
        try:
            principal = Principal(name, parse_roles(roles), "token")
            if token.startswith("sha256:"):
                digest = bytes.fromhex(token.removeprefix("sha256:"))
                if len(digest) != 32:
                    raise ValueError("a sha256: token needs 64 hex digits")
            elif len(token) < 16:
                raise ValueError("token shorter than 16 characters")
            else:
                digest = _token_digest(token)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        found[digest] = principal
    return found


def read_users(path: Path) -> dict[str, tuple[frozenset[str], str]]:
    """The users file: name -> (roles, password hash). Raises ValueError with the line."""
    found: dict[str, tuple[frozenset[str], str]] = {}
    text = refuse_placeholder_lines(
        path.read_text(encoding="utf-8"), "D2R_HTTP_USERS_FILE", str(path)
    )
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(":")
        if len(parts) != 3 or not parts[0] or not parts[2].startswith("scrypt$"):
            raise ValueError(f"{path}:{number}: expected NAME:ROLES:scrypt$... (d2r http-user)")
        try:
            found[parts[0]] = (parse_roles(parts[1]), parts[2])
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
    return found


class _Watched:
    """A file parsed with ``parse`` again whenever its mtime or size changes."""

    def __init__(self, path: Path, parse: Callable[[Path], Any]) -> None:
        self.path = path
        self._parse = parse
        self._stamp: tuple[int, int] | None = None
        self._value: Any = parse(path)
        st = path.stat()
        self._stamp = (st.st_mtime_ns, st.st_size)
        self._lock = threading.Lock()

    def get(self) -> Any:
        try:
            st = self.path.stat()
        except OSError:
            return self._value  # a Secret being swapped: keep what was read last
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            with self._lock:
                self._stamp = stamp
                try:
                    self._value = self._parse(self.path)
                except (OSError, ValueError) as exc:  # the message names a line, not a secret
                    logger.warning(
                        "%s changed but cannot be used (%s); keeping its last contents",
                        self.path,
                        exc,
                    )
        return self._value


# ------------------------------------------------------------------------------ limiter
def client_key(client: str) -> str:
    """The key failures of ``client`` count under: an IPv4 address (IPv4-mapped IPv6 included)
    as it is, an IPv6 address by its /64, so that one host cannot rotate through addresses.

    >>> client_key("2001:db8::1") == client_key("2001:db8::ffff:2"), client_key("::ffff:10.0.0.1")
    (True, '10.0.0.1')
    """
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class FailureLimiter:
    """Failed attempts in a sliding window: per client (:func:`client_key`) and for all clients
    together (``max_total``), so that neither one client nor many addresses can keep guessing.

    The per-client table holds at most ``max_clients`` keys; evicting the oldest cannot reopen
    guessing, since every failure also counts against the shared budget.
    """

    def __init__(
        self,
        max_failures: int,
        window: float,
        *,
        max_total: int | None = None,
        max_clients: int = 10000,
    ) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_total = max_total if max_total is not None else 10 * max_failures
        self.max_clients = max_clients
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._total: deque[float] = deque(maxlen=self.max_total)
        self._lock = threading.Lock()

    def _expire(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()

    def retry_after(self, client: str, now: float | None = None) -> float:
        """Seconds until ``client`` may try again (0: not blocked)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._failures.get(client_key(client))
            if not times:
                return 0.0
            self._expire(times, now)
            if len(times) < self.max_failures:
                return 0.0
            return max(0.0, times[0] + self.window - now)

    def total_retry_after(self, now: float | None = None) -> float:
        """Seconds until the shared budget allows another attempt (0: not exhausted)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._expire(self._total, now)
            if len(self._total) < self.max_total:
                return 0.0
            return max(0.0, self._total[0] + self.window - now)

    def record_failure(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        key = client_key(client)
        with self._lock:
            times = self._failures.pop(key, None) or deque(maxlen=self.max_failures)
            times.append(now)
            self._failures[key] = times
            self._total.append(now)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)


# -------------------------------------------------------------------------- authenticator
@dataclass(frozen=True)
class Decision:
    """The answer to one request: ``status`` 200 (go on), 401, 403, 429 or 503.

    ``reason`` is a fixed token for logs and the refusal counter (no secrets, no user input).
    """

    status: int
    principal: Principal | None = None
    reason: str = ""
    retry_after: float = 0.0


LOCAL = Principal("local", frozenset(ROLES), "local")


class _Refused(Exception):
    """A password check refused before hashing (status, reason, seconds to wait)."""

    def __init__(self, status: int, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


class Authenticator:
    """Decides each request from the role its route needs, its peer address and its headers.

    Parameters
    ----------
    required : bool
        Whether credentials are needed at all (off only for a loopback-bound endpoint).
    tokens_file, users_file : Path, optional
        The credentials files (module docstring).
    trusted_proxies : tuple of networks
        Peer addresses whose ``proxy_header`` is believed.
    proxy_header : str
        The header naming the user a trusted proxy authenticated.
    proxy_roles : frozenset of str
        The roles of a proxy-authenticated user.
    limiter : FailureLimiter
        Failed attempts per client and in all.
    max_hashing : int
        Password hashes (scrypt, 16 MiB each) that may run at once; a basic-auth request that
        would need one more is answered 503 without hashing.
    """

    def __init__(
        self,
        *,
        required: bool,
        tokens_file: Path | None = None,
        users_file: Path | None = None,
        trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
        proxy_header: str = "X-Forwarded-User",
        proxy_roles: frozenset[str] = frozenset({"viewer"}),
        limiter: FailureLimiter | None = None,
        max_hashing: int = 2,
    ) -> None:
        self.required = required
        self._tokens = None if tokens_file is None else _Watched(tokens_file, read_tokens)
        self._users = None if users_file is None else _Watched(users_file, read_users)
        self.trusted_proxies = trusted_proxies
        self.proxy_header = proxy_header
        self.proxy_roles = proxy_roles
        self.limiter = limiter or FailureLimiter(10, 60.0)
        self.max_hashing = max_hashing
        self._hashing = threading.BoundedSemaphore(max_hashing)
        if self._users is not None:
            _dummy_hash()  # made now, not by the first unknown user's request
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._verified_lock = threading.Lock()

    @property
    def has_credentials(self) -> bool:
        return bool(self._tokens or self._users or self.trusted_proxies)

    def _trusted(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        return any(address in net for net in self.trusted_proxies)

    def _hash_check(self, password: str, encoded: str) -> bool:
        """:func:`verify_password` under the hashing gate and the shared failure budget."""
        wait = self.limiter.total_retry_after()
        if wait > 0:
            raise _Refused(429, "rate_limited_all", wait)
        if not self._hashing.acquire(blocking=False):
            raise _Refused(503, "hashing_busy", 1.0)
        try:
            return verify_password(password, encoded)
        finally:
            self._hashing.release()

    def _basic(self, value: str) -> Principal | None:
        try:
            raw = base64.b64decode(value, validate=True)
            name, _, password = raw.decode().partition(":")
        except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8
            return None
        if base64.b64encode(raw).decode() != value:  # one spelling per credential: canonical
            return None  # (stray bits in the last character would decode to the same bytes)
        entry = None if self._users is None else self._users.get().get(name)
        if entry is None:
            self._hash_check(password, _dummy_hash())  # as slow as a known user: no enumeration
            return None
        roles, encoded = entry
        # A verified (hash, password) pair is remembered by its digest: scrypt once per user.
        key = hashlib.sha256(f"{encoded}\0{password}".encode()).digest()
        with self._verified_lock:
            known = key in self._verified
        if not known:
            if not self._hash_check(password, encoded):
                return None
            with self._verified_lock:
                self._verified[key] = None
                while len(self._verified) > 256:
                    self._verified.popitem(last=False)
        return Principal(name, roles, "basic")

    def _credential(self, headers: Mapping[str, str]) -> tuple[Principal | None, str]:
        """(principal, "") or (None, reason) for what the request carries.

        Raises :class:`_Refused` when a password check is refused before hashing.
        """
        authorization = headers.get("authorization", "")
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            tokens = {} if self._tokens is None else self._tokens.get()
            principal = tokens.get(_token_digest(value.strip()))
            return (principal, "") if principal else (None, "bad_token")
        if scheme.lower() == "basic" and value.strip():
            principal = self._basic(value.strip())
            return (principal, "") if principal else (None, "bad_password")
        if authorization:
            return None, "bad_scheme"
        if headers.get(self.proxy_header.lower(), "").strip():
            return None, "untrusted_proxy"  # a trusted proxy's header was taken in decide()
        return None, "no_credential"

    def decide(
        self,
        role: str | None,
        client: str,
        headers: Mapping[str, str],
        *,
        certificate: str | None = None,
    ) -> Decision:
        """The decision for a request whose route needs ``role`` (None: open, a role of
        :data:`ROLES`, or :data:`ANY_ROLE`), from peer address ``client``.

        ``headers`` has lower-case names. ``certificate`` names the subject of a TLS client
        certificate the handshake verified against ``D2R_HTTP_TLS_CA``: it holds the
        ``ingest`` role (and no other).
        """
        if role is None or not self.required:
            return Decision(200, LOCAL)
        if certificate is not None and role == "ingest":
            return Decision(200, Principal(certificate, frozenset({"ingest"}), "certificate"))
        user = headers.get(self.proxy_header.lower(), "").strip()
        if user and self._trusted(client):
            # The proxy authenticated the user (whatever Authorization it passes on), and all its
            # users share its address: the failure limiter does not apply.
            principal = Principal(user, self.proxy_roles, "proxy")
        else:
            wait = self.limiter.retry_after(client)
            if wait > 0:
                return Decision(429, reason="rate_limited", retry_after=wait)
            try:
                found, reason = self._credential(headers)
            except _Refused as refused:
                return Decision(
                    refused.status, reason=refused.reason, retry_after=refused.retry_after
                )
            if found is None:
                if reason != "no_credential":
                    self.limiter.record_failure(client)
                return Decision(401, reason=reason)
            principal = found
        if role != ANY_ROLE and role not in principal.roles:
            return Decision(403, principal, reason="missing_role")
        return Decision(200, principal)

    def identify(self, client: str, headers: Mapping[str, str]) -> Principal | None:
        """Who the request is, if it carries a credential that holds; None otherwise (a wrong
        one counts as a failure). For open routes that say more to a known caller."""
        if not self.required:
            return LOCAL
        if not headers.get("authorization") and not headers.get(self.proxy_header.lower()):
            return None
        decision = self.decide(ANY_ROLE, client, headers)
        return decision.principal if decision.status == 200 else None
