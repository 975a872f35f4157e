"""The syntax of `tune.pick`: which trial of a sweep `best.yaml` holds.

    highest score
    highest score with cost/trainable_params <= 5e6
    lowest cost/step_ms with score >= 30 and cost/peak_mem_mb < 4000

`highest` or `lowest`, a report key (eval/keys.py), then optional conditions `with KEY OP NUMBER`
joined by `and` (OP: <=, <, >=, >, also ≤ and ≥). Among the trials that meet every condition the
best by the key is picked (tune/search.py). Parsed when the config is loaded (config/rules.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_OPS = {"<=": "<=", "≤": "<=", "<": "<", ">=": ">=", "≥": ">=", ">": ">"}
_HEAD = re.compile(r"^\s*(highest|lowest)\s+(\S+)(?:\s+with\s+(.+?))?\s*$")
_CONDITION = re.compile(r"^\s*([^\s<>=≤≥]+)\s*(<=|>=|≤|≥|<|>)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Pick:
    metric: str
    mode: str  # "max" | "min"
    conditions: tuple[tuple[str, str, float], ...] = ()  # (key, op, value)

    def keys(self) -> list[str]:
        return [self.metric] + [key for key, _, _ in self.conditions]

    def admits(self, row: dict) -> bool:
        """Whether a trial row meets every condition (a missing value meets none)."""
        for key, op, bound in self.conditions:
            value = row.get(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                return False
            if not {"<=": value <= bound, "<": value < bound, ">=": value >= bound, ">": value > bound}[op]:
                return False
        return True

    def text(self) -> str:
        head = f"{'highest' if self.mode == 'max' else 'lowest'} {self.metric}"
        if not self.conditions:
            return head
        return head + " with " + " and ".join(f"{k} {op} {v:g}" for k, op, v in self.conditions)


class PickSyntaxError(ValueError):
    pass


def parse_pick(text: str) -> Pick:
    """`tune.pick` text -> Pick; PickSyntaxError saying what is wrong."""
    head = _HEAD.match(text)
    if head is None:
        raise PickSyntaxError(f"expected 'highest|lowest KEY [with KEY OP NUMBER [and ...]]', got {text[:80]!r}")
    word, metric, rest = head.groups()
    conditions = []
    for part in re.split(r"\s+and\s+", rest) if rest else []:
        m = _CONDITION.match(part)
        if m is None:
            raise PickSyntaxError(f"condition {part.strip()[:60]!r}: expected KEY OP NUMBER with OP one of <=, <, >=, >")
        key, op, number = m.groups()
        try:
            value = float(number)
        except ValueError:
            raise PickSyntaxError(f"condition {part.strip()[:60]!r}: {number!r} is not a number") from None
        if not math.isfinite(value):
            raise PickSyntaxError(f"condition {part.strip()[:60]!r}: the bound must be a finite number")
        conditions.append((key, _OPS[op], value))
    return Pick(metric, "max" if word == "highest" else "min", tuple(conditions))
