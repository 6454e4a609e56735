"""``adapter_config.json`` of a PEFT LoRA adapter: parsed, validated, and its per-module rank / alpha patterns.

``rank_pattern`` / ``alpha_pattern`` keys are regular expressions that PEFT matches against a suffix of each
module name (``(.*\\.)?(key)$``). They come from the adapter's file, so they are untrusted: a key such as
``(a+)+$`` backtracks exponentially and would hang Python's ``re`` (which has no time limit). A key is therefore
refused unless its match time is at most linear per suffix: at most one repeat (``*``, ``+``, ``{m,n}``), no
repeat inside a repeat or over alternatives, no backreference. Real keys are module names (``q_proj``,
``model.layers.0.self_attn.q_proj``) or a single ``.*`` / ``\\d+``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from modelatlas.errors import CheckpointError

try:
    from re import _parser as _sre  # Python 3.11+
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre

_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}


@dataclass(frozen=True)
class LoraConfig:
    """The fields of ``adapter_config.json`` that define ``dW``."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None

    def scale(self, module: str) -> tuple[int, float]:
        """(r, s) for ``module``: per-module overrides first, then the global values."""
        key = _pattern_key(self.rank_pattern, module)
        r = self.rank_pattern[key] if key else self.r
        key = _pattern_key(self.alpha_pattern, module)
        alpha = self.alpha_pattern[key] if key else self.lora_alpha
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


def _pattern_key(patterns: dict, module: str) -> str | None:
    """The pattern PEFT would apply to ``module``: an exact name, else a regex matching a name suffix.
    Keys were checked by :func:`pattern_problem`, so each match takes O(len(module)^2) at worst."""
    if module in patterns:
        return module
    for key in patterns:
        try:
            if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
                return key
        except re.error:
            continue
    return None


def pattern_problem(key: str) -> str | None:
    """Why regex ``key`` could backtrack for longer than linear time per match attempt, else None. Time
    O(len(key))."""
    try:
        tree = _sre.parse(key)
    except (re.error, RecursionError, OverflowError):
        return None  # invalid: never matches (skipped, as before)
    repeats, stack = 0, [(list(tree), False)]
    while stack:
        items, in_repeat = stack.pop()
        for op, av in items:
            if op in _REPEATS:
                if av[1] > 1 and in_repeat:
                    return "a repeat inside a repeat"
                repeats += av[1] > 1
                stack.append((list(av[2]), in_repeat or av[1] > 1))
            elif op is _sre.BRANCH:
                if in_repeat:
                    return "a repeat of alternatives"
                stack.extend((list(alt), False) for alt in av[1])
            elif op is _sre.SUBPATTERN:
                stack.append((list(av[-1]), in_repeat))
            elif op is getattr(_sre, "ATOMIC_GROUP", None):  # (?>...), Python 3.11+
                stack.append((list(av), in_repeat))
            elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
                stack.append((list(av[1]), in_repeat))
            elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
                return "a backreference"
    return f"{repeats} repeats (at most 1)" if repeats > 1 else None


def read_adapter_config(path: Path) -> LoraConfig:
    """Parse and validate ``adapter_config.json``; errors name the file and the key."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, huge integers
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0]
        raise CheckpointError(path, f"corrupt adapter config: {reason}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(path, "corrupt adapter config: not a JSON object")
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise CheckpointError(path, f"unsupported peft_type {raw.get('peft_type')!r}: only LORA adapters are read")
    if raw.get("use_dora"):  # dW = m * (W + sBA) / ||W + sBA|| - W needs the base and the magnitudes
        raise CheckpointError(path, "key 'use_dora' is true: DoRA adapters are not supported (their update "
                                    "is not s * B @ A)")
    for key in ("r", "lora_alpha"):  # PEFT writes both; its LoraConfig defaults (8) would guess dW's scale
        if raw.get(key) is None:
            raise CheckpointError(path, f"key {key!r} is missing (PEFT writes it; if the adapter was trained with "
                                        f'PEFT\'s default, add "{key}": 8)')
    return LoraConfig(
        r=_number(path, "'r'", raw.get("r"), integer=True),
        lora_alpha=_number(path, "'lora_alpha'", raw.get("lora_alpha")),
        target_modules=raw.get("target_modules"),
        rank_pattern=_patterns(path, "rank_pattern", raw.get("rank_pattern"), integer=True),
        alpha_pattern=_patterns(path, "alpha_pattern", raw.get("alpha_pattern"), integer=False),
        use_rslora=bool(raw.get("use_rslora", False)), fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        base_model_name_or_path=raw.get("base_model_name_or_path"))


def _number(path: Path, where: str, value: object, integer: bool = False) -> float:
    """``value`` as a positive finite number (a whole one for ranks), or a CheckpointError naming ``where``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    ok = ok and (not integer or value < 2**63)
    if not ok or (integer and value != int(value)):
        kind = "positive number (a whole one)" if integer else "positive number"
        raise CheckpointError(path, f"key {where} must be a {kind}, got {value!r:.40}")
    return int(value) if integer else float(value)


def _patterns(path: Path, key: str, value: object, integer: bool) -> dict:
    """``rank_pattern`` / ``alpha_pattern``: module name or regex -> positive number, each regex safe to match."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(path, f"key {key!r} must be an object of module pattern -> number, got "
                                    f"{type(value).__name__}")
    out = {}
    for pattern, v in value.items():
        problem = pattern_problem(pattern)
        if problem is not None:
            raise CheckpointError(path, f"key {key!r}: pattern {pattern[:80]!r} could take too long to match "
                                        f"({problem}); write out the module names instead")
        out[pattern] = _number(path, f"{key!r} entry {pattern[:80]!r}", v, integer)
    return out
