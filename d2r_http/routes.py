"""The HTTP endpoint's one route table: each request target is parsed once, and the entry it
matches decides both who may ask (the role) and what answers (the handler).

A target must be an absolute path in normal form: no dot segments, no empty segments, no
percent-encoding, no fragment, ASCII without controls. Anything else is refused with 400 before
any credential is looked at, so no two readings of one path exist.

>>> match(parse_target("/studies/1.2.3/preview.png"))
(Route(name='preview', role='viewer', methods=('GET',)), {'study': '1.2.3'})
>>> match(parse_target("/metrics?x=1"))[0].role
'metrics'
>>> match(parse_target("/fhir/DiagnosticReport"))[0]
Route(name='fhir', role='feedback', methods=('POST',))
>>> parse_target("studies/1.2.3")
Traceback (most recent call last):
...
d2r_http.routes.BadTarget: not an absolute path
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ANY_ROLE",
    "ROLES",
    "ROUTES",
    "BadTarget",
    "Route",
    "Target",
    "match",
    "parse_target",
]

#: The roles a credential can hold.
ROLES: Final = ("metrics", "viewer", "ingest", "feedback")
#: What a path outside the table needs: any credential (it then answers 404), so an anonymous
#: client learns nothing about the routes.
ANY_ROLE: Final = "any"

#: Longest request target taken (http.server refuses request lines over 64 KiB with 414).
MAX_TARGET: Final = 2048
#: A path segment that names a study: a DICOM UID (digits and dots, at most 64 characters) or,
#: for studies recorded from lax senders, letters, digits, ``.``, ``-`` and ``_``.
_UID = r"(?P<study>[0-9A-Za-z._-]{1,64})"
#: Characters a path may hold as they are (RFC 3986 unreserved, ``/`` and a few sub-delims).
_PATH_CHARS = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@/-]*")
_QUERY_CHARS = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@/?%-]*")


class BadTarget(ValueError):
    """A request target that is not an absolute path in normal form (answered 400)."""


@dataclass(frozen=True)
class Target:
    """A parsed request target: its path (normal form) and its raw query (possibly empty)."""

    path: str
    query: str = ""


@dataclass(frozen=True)
class Route:
    """One entry of :data:`ROUTES`: its name (the handler), the role it needs (None: open to
    all) and the methods it answers."""

    name: str
    role: str | None
    methods: tuple[str, ...] = ("GET",)


#: (pattern, route): the first full match wins.
ROUTES: Final[tuple[tuple[re.Pattern[str], Route], ...]] = (
    (re.compile(r"/healthz"), Route("healthz", None)),
    (re.compile(r"/readyz"), Route("readyz", None)),
    (re.compile(r"/metrics"), Route("metrics", "metrics")),
    (re.compile(r"/(?:index\.html)?"), Route("index", "viewer")),
    (re.compile(rf"/studies/{_UID}"), Route("study", "viewer")),
    (re.compile(rf"/studies/{_UID}/preview\.png"), Route("preview", "viewer")),
    (re.compile(r"/dicom-web/studies"), Route("stow", "ingest", ("POST",))),
    (re.compile(rf"/dicom-web/studies/{_UID}"), Route("stow", "ingest", ("POST",))),
    (re.compile(r"/fhir/DiagnosticReport"), Route("fhir", "feedback", ("POST",))),
)
#: Any other path: any credential, then 404.
UNKNOWN: Final = Route("unknown", ANY_ROLE, ())


def parse_target(raw: str) -> Target:
    """The request target ``raw`` (origin form) as a :class:`Target`.

    Raises
    ------
    BadTarget
        For a target that is not an absolute path (``studies/x``, ``*``, ``http://...``), or that
        normalises to something else (``//``, ``/./``, ``/../``, ``%xx``), or that holds a
        fragment, a control character, non-ASCII text or more than :data:`MAX_TARGET`
        characters.
    """
    if len(raw) > MAX_TARGET:
        raise BadTarget("target too long")
    if not raw.startswith("/"):
        raise BadTarget("not an absolute path")
    path, sep, query = raw.partition("?")
    if not _PATH_CHARS.fullmatch(path):
        raise BadTarget("path holds characters outside its normal form")
    if sep and not _QUERY_CHARS.fullmatch(query):
        raise BadTarget("query holds characters outside its normal form")
    segments = path.split("/")[1:]
    if any(s in (".", "..") for s in segments):
        raise BadTarget("path holds a dot segment")
    if "" in segments[:-1]:
        raise BadTarget("path holds an empty segment")
    return Target(path, query)


def match(target: Target) -> tuple[Route, dict[str, str]]:
    """The route ``target`` names and its parameters (``{"study": uid}``), else
    (:data:`UNKNOWN`, {})."""
    for pattern, route in ROUTES:
        found = pattern.fullmatch(target.path)
        if found is not None:
            return route, {k: v for k, v in found.groupdict().items() if v is not None}
    return UNKNOWN, {}
