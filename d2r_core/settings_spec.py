"""Settings declared once: a :class:`Setting` names a ``D2R_*`` variable, its default, its parser
and its one-line documentation.

Each package declares its settings beside its settings dataclass, whose ``from_env`` reads them
with :meth:`Setting.read` (through :func:`~d2r_core.config.env_setting`: a blank value is unset,
an invalid one raises :class:`~d2r_core.errors.ConfigError` naming the setting). The README's
configuration table, the example configurations and ``d2r config`` are made from the same
declarations.

>>> PORT = Setting("D2R_PORT", 11112, int, "DICOM port", Group.LISTENER)
>>> PORT.read({"D2R_PORT": " 104 "}), PORT.read({"D2R_PORT": ""}), PORT.shown_default
(104, 11112, '`11112`')
>>> PORT.source({"D2R_PORT": "104"}, {}), PORT.source({}, {"D2R_PORT": "105"})
('config file', 'environment')
>>> mask_secret("postgresql+psycopg://d2r:s3cret@db.example.org/d2r")
'postgresql+psycopg://d2r:***@db.example.org/d2r'
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from d2r_core.config import env_setting

__all__ = [
    "DEFAULT",
    "ENVIRONMENT",
    "FILE",
    "MASK",
    "Group",
    "Setting",
    "catalogue",
    "format_value",
    "mask_secret",
    "plain_text",
]

T = TypeVar("T")

#: where a setting's value came from (:meth:`Setting.source`)
DEFAULT = "default"
FILE = "config file"
ENVIRONMENT = "environment"


class Group(enum.Enum):
    """The sections the settings are documented in, in the order the documentation lists them."""

    LISTENER = "DICOM listener (d2r node, d2r serve)"
    STORAGE = "Storage: spool shared by node and workers; the study database"
    NODES = 'Several nodes, active-active (docs/operations.md, "High availability")'
    ASSEMBLY = "Study assembly and attempts"
    QUEUE = "Queue (d2r node + d2r worker; d2r serve uses an embedded queue)"
    MODEL = "Worker: model, device and inference backend"
    OUTPUT = "Model output"
    DELIVERY = "Reports and their destinations (SRs go back into the same study)"
    FEEDBACK = "Signed reports, agreement and drift (HL7 v2, FHIR, DICOM SR)"
    HTTP = "HTTP: /metrics, /healthz, /readyz, the status page and STOW-RS"
    AUDIT = "Audit log: one JSON line per association, received object and sent object"
    ACCESS = "Access control and DICOM TLS (docs/security.md)"
    LOGGING = "Logging"


class _Missing(enum.Enum):
    MISSING = enum.auto()


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One ``D2R_*`` setting.

    Parameters
    ----------
    name : str
        The variable, e.g. ``D2R_PORT``.
    default : T
        The value of an unset (or blank) variable, unless ``default_from`` computes it.
    parse : callable
        Text (stripped, not blank) to value; raises ``ValueError`` (or a ``ConfigError``) on
        an invalid value.
    doc : str
        One line of Markdown: what the setting does (the README's "Meaning" column).
    group : Group
        The documentation section it belongs to.
    shown : str
        The default as the documentation shows it (Markdown), where the default's own text
        does not say it (a computed default, a size); empty: ``default`` in backticks.
    secret : bool
        The value may hold a password or token: ``d2r config`` shows it masked.
    default_from : callable or None
        Computes the default from the other settings (e.g. a file beside the spool).
    """

    name: str
    default: T
    parse: Callable[[str], T]
    doc: str
    group: Group
    shown: str = ""
    secret: bool = False
    default_from: Callable[[Mapping[str, str]], T] | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"D2R_[A-Z0-9_]+", self.name):
            raise ValueError(f"{self.name!r} is not a D2R_* name")
        if not self.doc or "\n" in self.doc or "|" in self.doc:
            raise ValueError(f"{self.name}: doc must be one line without '|'")

    def default_value(self, env: Mapping[str, str]) -> T:
        """The value of this setting when ``env`` leaves it unset."""
        return self.default if self.default_from is None else self.default_from(env)

    def read(
        self,
        env: Mapping[str, str],
        *,
        default: T | _Missing = _Missing.MISSING,
        parse: Callable[[str], T] | None = None,
    ) -> T:
        """The setting's value in ``env``.

        Parameters
        ----------
        env : mapping
            ``D2R_*`` variables (the config file overridden by the environment).
        default : T, optional
            Replaces the declared default (a caller's own, e.g. ``d2r serve``'s broker).
        parse : callable, optional
            Replaces the declared parser where parsing depends on another setting.

        Raises
        ------
        ConfigError
            Naming this setting, when its value is invalid.
        """
        fallback = self.default_value(env) if isinstance(default, _Missing) else default
        return env_setting(env, self.name, fallback, parse or self.parse)

    def raw(self, env: Mapping[str, str]) -> str | None:
        """The text of the variable, stripped; None when unset or blank (the default)."""
        text = env.get(self.name)
        return None if text is None or not text.strip() else text.strip()

    def source(self, file_values: Mapping[str, str], environ: Mapping[str, str]) -> str:
        """Where the effective value comes from: :data:`ENVIRONMENT`, :data:`FILE` or
        :data:`DEFAULT` (the environment overrides the file; a blank value is unset)."""
        if self.name in environ:
            return DEFAULT if self.raw(environ) is None else ENVIRONMENT
        return DEFAULT if self.raw(file_values) is None else FILE

    def shown_value(self, env: Mapping[str, str]) -> str:
        """The effective value as ``d2r config`` prints it: the text given (masked when
        secret), else the default (as the documentation words an empty one)."""
        text = self.raw(env)
        if text is not None:
            return mask_secret(text) if self.secret else text
        value = format_value(self.default_value(env))
        if value or self.default_from is not None:
            return value or "none"
        return plain_text(self.shown_default)  # "any", "the checkpoint's", "none"

    @property
    def shown_default(self) -> str:
        """The default as the README shows it (Markdown)."""
        if self.shown:
            return self.shown
        text = format_value(self.default)
        return f"`{text}`" if text else "none"

    @property
    def text_default(self) -> str:
        """The default as a config file writes it; empty where it is computed or none."""
        return "" if self.default_from is not None else format_value(self.default)

    @property
    def plain_doc(self) -> str:
        """:attr:`doc` without Markdown markup (for comments and terminals)."""
        return plain_text(self.doc)


def format_value(value: object) -> str:
    """A setting's value as text: ``true``/``false``, numbers without a needless ``.0``,
    collections comma-separated, ``None`` empty.

    >>> format_value(True), format_value(30.0), format_value(0.5), format_value(("A", "B"))
    ('true', '30', '0.5', 'A,B')
    >>> format_value(1e9)
    '1000000000'
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, frozenset | set):
        return ",".join(sorted(format_value(v) for v in value))
    if isinstance(value, tuple | list):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    name = getattr(value, "name", None)  # a destination address: its canonical text
    return name if isinstance(name, str) and not isinstance(value, str) else str(value)


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#;\s]*)@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&][^=&#;]*(?:pass|pwd|token|secret|key)[^=&#;]*=)[^&#;]*", re.IGNORECASE
)
MASK = "***"


def mask_secret(text: str) -> str:
    """``text`` with the secrets of its URLs masked: the password of ``user:password@`` (or
    a lone token before ``@``) and query values named like a password, token, secret or key.

    Text that holds no URL is masked whole.

    >>> mask_secret("sentinel://:pw@h1:26379;sentinel://:pw@h2:26379")
    'sentinel://:***@h1:26379;sentinel://:***@h2:26379'
    >>> mask_secret("redis://t0ken@redis:6379/0"), mask_secret("db?password=x&sslmode=on")
    ('redis://***@redis:6379/0', '***')
    >>> mask_secret("postgresql://db/d2r?user=d2r&password=x&sslmode=require")
    'postgresql://db/d2r?user=d2r&password=***&sslmode=require'
    """
    if "://" not in text:
        return MASK if text else text

    def userinfo(match: re.Match[str]) -> str:
        user, colon, _ = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:{MASK}@" if colon else f"{match['scheme']}{MASK}@"

    return _SECRET_QUERY.sub(lambda m: m["key"] + MASK, _USERINFO.sub(userinfo, text))


def plain_text(markdown: str) -> str:
    """Markdown inline markup (code spans, bold) removed.

    >>> plain_text("`cpu`, **every** `cuda:N`")
    'cpu, every cuda:N'
    """
    return markdown.replace("**", "").replace("`", "")


def catalogue(*declarations: Iterable[Setting[Any]]) -> tuple[Setting[Any], ...]:
    """Every setting of ``declarations``, grouped in :class:`Group` order (declaration order
    within a group).

    Raises
    ------
    ValueError
        When two declarations name the same variable.
    """
    settings = [s for group in declarations for s in group]
    seen: set[str] = set()
    for setting in settings:
        if setting.name in seen:
            raise ValueError(f"{setting.name} is declared twice")
        seen.add(setting.name)
    order = {group: index for index, group in enumerate(Group)}
    return tuple(sorted(settings, key=lambda s: order[s.group]))
