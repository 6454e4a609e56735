"""Config field names in error messages, written as the flags a user typed.

A config dataclass names its own fields when it refuses a value (``match_steps must be >= 0``): right for a
library user who wrote ``DDMConfig(match_steps=-1)``, a riddle for one who typed ``--match-steps -1``. Each
command declares which of its flags set which config field (``field_flags`` among its parser's defaults,
:func:`add_field_flags`); the error mapper (:func:`modelatlas.cli.main.run_mapped`) rewrites the message of a
:class:`~modelatlas.errors.ConfigError` with them (:func:`named_by_flags`). Not a command module: ``main``
does not register it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# The subject a message opens with: a field ("depth"), "Class.field" ("ProbeXConfig.rank_u"), a field's key
# ("arch_kwargs.hidden") and a flag already given in brackets ("lam (--lambda)"), followed by what a field
# subject is followed by: ":", " must", a number ("trees 3, children 2, depth 2: ...", "ipc 3 is not ...").
# "dataset 'mnist5k': ..." is not matched: a quoted name is a value (there, one of --other-datasets).
_SUBJECT = re.compile(r"(?:[A-Z]\w*Config\.)?(?P<field>[a-z_][a-z0-9_]*)(?P<key>\.[a-z_][a-z0-9_]*)?"
                      r"(?: \(--[a-z][\w-]*\))?(?=:| must\b| -?\d)")
_NEXT = re.compile(r" -?[\w.]+, ")  # a subject's value and the comma before the next subject
_ASSIGNED = re.compile(r"(?<![\w.-])(?<!--set )(?P<field>[a-z_][a-z0-9_]*)=")  # "clusters_per_class=5"


def dashed(*fields: str) -> dict[str, str]:
    """Each field with the flag of its name: ``{"match_steps": "--match-steps"}``."""
    return {f: "--" + f.replace("_", "-") for f in fields}


def add_field_flags(parser, flags: Mapping[str, str]) -> None:
    """Declare that ``parser``'s flags set these config fields (field -> flag), added to those declared before
    (``add_recovery_options`` declares its own for every command that takes them)."""
    parser.set_defaults(field_flags={**(parser.get_default("field_flags") or {}), **flags})


def named_by_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with the fields it opens with, and every ``field=value`` in it, written as their flags:
    "match_steps must be >= 0" -> "--match-steps must be >= 0", "lam (--lambda) must be" -> "--lambda must
    be", "fewer than clusters_per_class=5" -> "fewer than --clusters-per-class 5". Fields not in ``flags``
    (set by ``--set FIELD=VALUE``, or by no flag) keep their names. O(len(message))."""
    if not flags:
        return message
    parts, pos = [], 0
    while (m := _SUBJECT.match(message, pos)) is not None and m["field"] in flags:
        parts.append(flags[m["field"]] + (f" {m['key'][1:]}" if m["key"] else ""))
        pos = m.end()
        after = _NEXT.match(message, pos)
        if after is None:
            break
        parts.append(after.group())
        pos = after.end()
    text = "".join(parts) + message[pos:]
    return _ASSIGNED.sub(lambda a: f"{flags[a['field']]} " if a["field"] in flags else a.group(), text)
