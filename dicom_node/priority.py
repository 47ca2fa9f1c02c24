"""A study's priority from where and how an instance came (pure; no I/O).

:func:`decide_priority` takes the routing rules (``D2R_PRIORITY_RULES``), the priorities the
instance's header names, the C-STORE request's Priority and who sent it, and returns a
:class:`PriorityDecision`: the priority and the source that decided it. Precedence, first
that speaks wins:

1. a rule matching the calling AE title, the called AE title or the sender's network (the
   highest of several matching rules);
2. Requested Procedure Priority (0040,1003), at the top level or inside an item of the
   Request Attributes Sequence (0040,0275): ``STAT`` -> stat, ``HIGH`` -> urgent,
   ``ROUTINE``/``MEDIUM`` -> routine, ``LOW`` -> low, case-insensitively (the highest of
   several); any other value is ignored, with a note;
3. the C-STORE request's Priority: ``HIGH`` -> urgent, ``LOW`` -> low (``MEDIUM`` says
   nothing); STOW-RS has none;
4. ``D2R_PRIORITY_DEFAULT``.

The study database keeps the highest priority any instance of a study brought.

>>> rules = parse_priority_rules("ED_CR1,ICU_DX=stat; 10.2.0.0/16=urgent; called:D2R_LOW=low")
>>> decide_priority(rules, calling_ae_title="ICU_DX").source
'rule: calling AE ICU_DX'
>>> d = decide_priority(rules, calling_ae_title="CR9", address="10.2.7.1", dimse_priority=2)
>>> str(d.priority), d.source
('urgent', 'rule: network 10.2.0.0/16')
>>> d = decide_priority((), header_priorities=(("Requested Procedure Priority", "high"),))
>>> str(d.priority), d.source
('urgent', 'Requested Procedure Priority HIGH')
>>> d = decide_priority((), header_priorities=(("Requested Procedure Priority", "SOON"),),
...                     dimse_priority=DIMSE_HIGH)
>>> str(d.priority), d.source
('urgent', 'C-STORE Priority HIGH')
>>> d.notes
("Requested Procedure Priority 'SOON' not recognised; ignored",)
>>> str(decide_priority((), default=Priority.LOW).priority)
'low'
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from d2r_core.config import IPNetwork
from d2r_core.errors import ConfigError
from d2r_core.priority import Priority, PriorityDecision

__all__ = [
    "DIMSE_HIGH",
    "DIMSE_LOW",
    "DIMSE_MEDIUM",
    "HEADER_PRIORITY_VALUES",
    "PriorityDecision",
    "PriorityPolicy",
    "PriorityRule",
    "decide_priority",
    "parse_priority_rules",
]

#: C-STORE Priority (0000,0700) values (PS3.7 Section 9.3.1.1)
DIMSE_MEDIUM = 0
DIMSE_HIGH = 1
DIMSE_LOW = 2
_DIMSE_PRIORITIES = {DIMSE_HIGH: ("HIGH", Priority.URGENT), DIMSE_LOW: ("LOW", Priority.LOW)}

#: Requested Procedure Priority (0040,1003) defined terms and what each means here
HEADER_PRIORITY_VALUES = {
    "STAT": Priority.STAT,
    "HIGH": Priority.URGENT,
    "ROUTINE": Priority.ROUTINE,
    "MEDIUM": Priority.ROUTINE,
    "LOW": Priority.LOW,
}
#: the longest header value a note quotes (a CS value has 16 characters at most)
_QUOTED_CHARS = 16
_SETTING = "D2R_PRIORITY_RULES"


@dataclass(frozen=True)
class PriorityRule:
    """One routing rule: instances matching ``kind`` ``value`` get ``priority``.

    ``kind`` is ``calling`` (calling AE title), ``called`` (called AE title) or ``network``.
    """

    kind: str
    value: str | IPNetwork
    priority: Priority

    def matches(self, calling_ae_title: str, called_ae_title: str, address: str) -> bool:
        if self.kind == "calling":
            return calling_ae_title.strip() == self.value
        if self.kind == "called":
            return called_ae_title.strip() == self.value
        ip = _ip(address)
        return (
            ip is not None
            and isinstance(self.value, (ipaddress.IPv4Network, ipaddress.IPv6Network))
            and ip in self.value
        )

    def describe(self) -> str:
        what = {"calling": "calling AE", "called": "called AE", "network": "network"}[self.kind]
        return f"{what} {self.value}"


@dataclass(frozen=True)
class PriorityPolicy:
    """What the node decides priorities with: the rules and the default (from settings)."""

    rules: tuple[PriorityRule, ...] = ()
    default: Priority = Priority.ROUTINE


def parse_priority_rules(text: str, setting: str = _SETTING) -> tuple[PriorityRule, ...]:
    """Parse ``KEY[,KEY...]=PRIORITY[; ...]``.

    A key is an IP address or CIDR network (the sender's address), ``called:TITLE`` (the
    called AE title) or a calling AE title (``calling:TITLE`` or just ``TITLE``).

    >>> [r.describe() for r in parse_priority_rules("ED_CR1, ICU_DX = stat ;10.2.0.0/16=urgent")]
    ['calling AE ED_CR1', 'calling AE ICU_DX', 'network 10.2.0.0/16']
    >>> parse_priority_rules("ED=soon")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    d2r_core.errors.ConfigError: D2R_PRIORITY_RULES: rule 'ED=soon': expected one of ...
    """
    rules: list[PriorityRule] = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        keys, sep, value = part.rpartition("=")
        if not sep or not keys.strip():
            raise ConfigError(setting, f"rule {part!r}: expected KEY[,KEY...]=PRIORITY")
        try:
            priority = Priority.parse(value)
        except ValueError as exc:
            raise ConfigError(setting, f"rule {part!r}: {exc}") from None
        for key in (k.strip() for k in keys.split(",")):
            rules.append(_rule(key, priority, part, setting))
    return tuple(rules)


def _rule(key: str, priority: Priority, part: str, setting: str) -> PriorityRule:
    if not key:
        raise ConfigError(setting, f"rule {part!r}: empty key")
    kind, colon, rest = key.partition(":")
    if colon and kind.lower() in ("calling", "called"):
        return PriorityRule(kind.lower(), _ae_title(rest, part, setting), priority)
    if any(c.isdigit() for c in key) and ("." in key or ":" in key):
        try:
            return PriorityRule("network", ipaddress.ip_network(key, strict=False), priority)
        except ValueError:
            pass  # an AE title with dots or digits
    return PriorityRule("calling", _ae_title(key, part, setting), priority)


def _ae_title(text: str, part: str, setting: str) -> str:
    title = text.strip()
    if not title or len(title) > 16 or "\\" in title or not title.isprintable():
        raise ConfigError(setting, f"rule {part!r}: {text!r} is not an AE title (1-16 characters)")
    return title


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _quoted(value: str) -> str:
    text = "".join(c if c.isprintable() and c.isascii() else "?" for c in value.strip())
    return text[:_QUOTED_CHARS] + ("..." if len(text) > _QUOTED_CHARS else "")


def decide_priority(
    rules: Sequence[PriorityRule],
    *,
    calling_ae_title: str = "",
    called_ae_title: str = "",
    address: str = "",
    header_priorities: Sequence[tuple[str, str]] = (),
    dimse_priority: int | None = None,
    default: Priority = Priority.ROUTINE,
) -> PriorityDecision:
    """The priority of one instance, and its source (see the module's precedence).

    ``header_priorities`` are (attribute name, value) pairs of the instance's header;
    ``dimse_priority`` is the C-STORE request's Priority (None for STOW-RS).
    """
    matched = [r for r in rules if r.matches(calling_ae_title, called_ae_title, address)]
    notes: list[str] = []
    recognised: list[tuple[Priority, str]] = []
    for name, value in header_priorities:
        if not value.strip():
            continue
        mapped = HEADER_PRIORITY_VALUES.get(value.strip().upper())
        if mapped is None:
            notes.append(f"{name} {_quoted(value)!r} not recognised; ignored")
        else:
            recognised.append((mapped, f"{name} {value.strip().upper()}"))
    if matched:
        best = min(matched, key=lambda r: r.priority.rank)
        return PriorityDecision(best.priority, f"rule: {best.describe()}", tuple(notes))
    if recognised:
        priority, source = min(recognised, key=lambda p: p[0].rank)
        return PriorityDecision(priority, source, tuple(notes))
    if dimse_priority in _DIMSE_PRIORITIES:
        name, priority = _DIMSE_PRIORITIES[dimse_priority]
        return PriorityDecision(priority, f"C-STORE Priority {name}", tuple(notes))
    return PriorityDecision(default, "default", tuple(notes))
