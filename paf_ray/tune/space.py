"""The search-space syntax of ``tune.search_space`` and how a sampled point becomes a run config.

A search space maps a **dotted config key** to a **spec** (see docs/tune.md):

    model.adapter.kind: {choice: [bypass, lora]}
    model.adapter.stages: {choice: [[1, 2, 3, 4], [3, 4]]}   # any YAML values
    train.stages.0.lr: {loguniform: [1.0e-4, 1.0e-2]}
    model.lv_adapter.tau: {uniform: [0.03, 0.2]}
    model.lv_adapter.n_ctx: {int: [4, 16]}                    # bounds included; `step: 4` optional
    model.fpn_channels: 64                                     # a plain value: fixed for every trial

Nested sections are accepted too (``model: {adapter: {kind: {choice: [...]}}}``). Two keys are
not config keys:

- ``adapt_fraction``: the share of ``tune.total_epochs`` given to the adapt stage; the rest goes
  to finetune, each at least 1 epoch. A value of 0 drops the adapt stage (pretrain-finetune,
  adapters off), so such trials compete on the same epoch budget.
- ``backbone``: added by itself when ``tune.backbones`` lists entries ``{name, weights, format}``
  (optional ``label`` and other ``model.backbone`` keys); one choice over those entries.

Optuna's categorical distribution holds only None/bool/int/float/str, so choices of lists or
mappings are sampled as their JSON text and decoded when the trial config is built.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from typing import Any

from paf_ray.config import Config, ConfigError, TuneConfig, apply_override, from_dict, to_dict

SPEC_KINDS = ("choice", "uniform", "loguniform", "int")
ADAPT_FRACTION = "adapt_fraction"
BACKBONE = "backbone"
_SCALARS = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Dimension:
    """One searched or fixed parameter."""

    key: str  # dotted config key, or `adapt_fraction` / `backbone`
    kind: str  # choice | uniform | loguniform | int | fixed
    values: tuple = ()  # choice: the choices as sampled (scalars, or JSON text for lists/maps)
    choices: tuple = ()  # choice: the choices as written in the config
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    fixed: Any = None


def _is_spec(value: Any) -> bool:
    return isinstance(value, dict) and any(k in value for k in SPEC_KINDS)


def flatten_space(space: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections -> dotted keys; specs and plain values are leaves."""
    flat: dict[str, Any] = {}
    for key, value in space.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and not _is_spec(value) and value:
            flat.update(flatten_space(value, dotted))
        else:
            flat[dotted] = value
    return flat


def encode_choice(value: Any) -> Any:
    """A choice as Optuna can hold it: scalars as they are, lists/maps as JSON text."""
    if isinstance(value, _SCALARS):
        return value
    return json.dumps(value, sort_keys=True)


def decode_choice(value: Any, dim: Dimension) -> Any:
    """The config value of a sampled choice (the JSON text of a list back to the list)."""
    if dim.kind == "choice" and dim.choices:
        for sampled, written in zip(dim.values, dim.choices):
            if type(sampled) is type(value) and sampled == value:
                return written
    return value


def parse_dimension(key: str, spec: Any, source: str) -> Dimension:
    where = f"{source}: tune.search_space.{key}"
    if not _is_spec(spec):
        if isinstance(spec, dict) and not spec:
            raise ConfigError(f"{where}: empty mapping; expected a value or one of {', '.join(SPEC_KINDS)}")
        return Dimension(key, "fixed", fixed=spec)
    kinds = [k for k in SPEC_KINDS if k in spec]
    extra = sorted(set(spec) - set(SPEC_KINDS) - {"step"})
    if len(kinds) != 1 or extra:
        raise ConfigError(
            f"{where}: a spec has exactly one of {', '.join(SPEC_KINDS)} (plus optional `step`), got {sorted(spec)}"
        )
    kind = kinds[0]
    arg = spec[kind]
    step = spec.get("step")
    if kind == "choice":
        if step is not None:
            raise ConfigError(f"{where}: `step` does not apply to choice")
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"{where}: choice: expected a non-empty list, got {arg!r}")
        values = tuple(encode_choice(v) for v in arg)
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where}: choice: the choices repeat: {arg!r}")
        return Dimension(key, "choice", values=values, choices=tuple(arg))
    if not isinstance(arg, list) or len(arg) != 2:
        raise ConfigError(f"{where}: {kind}: expected [low, high], got {arg!r}")
    low, high = arg
    numbers = (int,) if kind == "int" else (int, float)
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, numbers):
            want = "an integer" if kind == "int" else "a number"
            raise ConfigError(f"{where}: {kind}: {name} must be {want}, got {v!r}")
    if not low < high:
        raise ConfigError(f"{where}: {kind}: low must be below high, got [{low}, {high}]")
    if kind == "loguniform":
        if low <= 0:
            raise ConfigError(f"{where}: loguniform: low must be > 0, got {low}")
        if step is not None:
            raise ConfigError(f"{where}: `step` does not apply to loguniform")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, numbers) or step <= 0:
            raise ConfigError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}, got {step!r}")
    if kind == "int":
        return Dimension(key, "int", low=int(low), high=int(high), step=int(step) if step else 1)
    return Dimension(key, kind, low=float(low), high=float(high), step=float(step) if step else None)


def backbone_label(entry: dict) -> str:
    """How a backbone entry is named in the tables: `label`, else name[:weights file][:format]."""
    if entry.get("label"):
        return str(entry["label"])
    label = str(entry.get("name"))
    if entry.get("weights"):
        label += ":" + os.path.basename(str(entry["weights"]))
    if entry.get("format") not in (None, "auto"):
        label += ":" + str(entry["format"])
    return label


def backbone_choices(tune: TuneConfig, source: str) -> dict[str, dict]:
    """label -> the `model.backbone` keys of that entry."""
    out: dict[str, dict] = {}
    for i, entry in enumerate(tune.backbones):
        where = f"{source}: tune.backbones[{i}]"
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{where}: expected a mapping with at least `name` (and `weights`, `format`), got {entry!r}")
        label = backbone_label(entry)
        if label in out:
            raise ConfigError(f"{where}: label {label!r} repeats an earlier entry; give each entry a distinct `label`")
        out[label] = {k: v for k, v in entry.items() if k != "label"}
    return out


def parse_space(tune: TuneConfig, source: str = "<config>") -> list[Dimension]:
    """The dimensions of `tune.search_space` (+ `backbone`), validated; fixed values included."""
    dims = [parse_dimension(k, v, source) for k, v in flatten_space(tune.search_space).items()]
    keys = [d.key for d in dims]
    if BACKBONE in keys:
        raise ConfigError(
            f"{source}: tune.search_space.backbone: list the backbones under tune.backbones "
            f"(entries {{name, weights, format}}) instead"
        )
    for d in dims:
        if d.key.startswith("tune.") or d.key == "name" or d.key == "command":
            raise ConfigError(f"{source}: tune.search_space.{d.key}: this key cannot be searched")
    choices = backbone_choices(tune, source)
    if choices:
        dims.append(Dimension(BACKBONE, "choice", values=tuple(choices), choices=tuple(choices)))
    frac = next((d for d in dims if d.key == ADAPT_FRACTION), None)
    if frac is not None:
        if tune.total_epochs is None:
            raise ConfigError(f"{source}: tune.search_space.adapt_fraction needs tune.total_epochs (the epoch budget)")
        values = {"fixed": [frac.fixed], "choice": list(frac.choices)}.get(frac.kind, [frac.low, frac.high])
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ConfigError(f"{source}: tune.search_space.adapt_fraction: values must lie in [0, 1], got {v!r}")
    elif tune.total_epochs is not None:
        raise ConfigError(
            f"{source}: tune.total_epochs is set but tune.search_space has no adapt_fraction "
            f"(a value, e.g. 0.5, or a spec) saying how to split it"
        )
    if not any(d.kind != "fixed" for d in dims):
        raise ConfigError(f"{source}: tune.search_space searches nothing: give at least one spec or two tune.backbones")
    return dims


def optuna_distributions(dims: list[Dimension]) -> dict:
    """The searched dimensions as Optuna distributions (fixed values are applied, not sampled)."""
    import optuna.distributions as od

    out = {}
    for d in dims:
        if d.kind == "choice":
            out[d.key] = od.CategoricalDistribution(list(d.values))
        elif d.kind == "uniform":
            out[d.key] = od.FloatDistribution(d.low, d.high, step=d.step)
        elif d.kind == "loguniform":
            out[d.key] = od.FloatDistribution(d.low, d.high, log=True)
        elif d.kind == "int":
            out[d.key] = od.IntDistribution(d.low, d.high, step=d.step)
    return out


def corner_points(dims: list[Dimension]) -> list[dict]:
    """Points that touch every bound and every choice of the space.

    Building the trial config at each catches a bad key or value before any trial starts.
    """
    points: list[dict] = [{}, {}]
    for d in dims:
        if d.kind == "choice":
            points[0][d.key], points[1][d.key] = d.values[0], d.values[-1]
        elif d.kind != "fixed":
            points[0][d.key], points[1][d.key] = d.low, d.high
    for d in dims:  # and every choice once, the rest at the low corner
        if d.kind == "choice":
            points.extend({**points[0], d.key: v} for v in d.values[1:-1])
    return points


def split_epochs(total: int, fraction: float, source: str) -> tuple[int, int]:
    """(adapt, finetune) epochs from the budget; adapt 0 only for fraction 0."""
    if fraction <= 0:
        return 0, total
    if total < 2:
        raise ConfigError(f"{source}: tune.total_epochs={total}: adapt and finetune need at least 1 epoch each")
    adapt = min(total - 1, max(1, int(math.floor(fraction * total + 0.5))))
    return adapt, total - adapt


def trial_config(
    base: Config, dims: list[Dimension], params: dict, name: str, source: str = "<tune>"
) -> Config:
    """The run config of one trial: `base` with the fixed and sampled values applied.

    The result has no `tune` section (a plain `paf-ray run` config) and is named `name`.
    """
    data = to_dict(base)
    data.pop("tune", None)
    data["name"] = name
    data["command"] = "run"
    fraction = None
    for d in dims:
        value = d.fixed if d.kind == "fixed" else params.get(d.key)
        if d.kind != "fixed" and d.key not in params:
            raise ConfigError(f"{source}: the sampled point has no value for {d.key!r}: {params}")
        value = decode_choice(value, d)
        if d.key == ADAPT_FRACTION:
            fraction = float(value)
        elif d.key == BACKBONE:
            entries = backbone_choices(base.tune, source)
            if value not in entries:
                raise ConfigError(f"{source}: backbone {value!r} is not one of tune.backbones: {list(entries)}")
            data["model"]["backbone"] = {**data["model"]["backbone"], "weights": None, "format": "auto",
                                         **copy.deepcopy(entries[value])}
        else:
            apply_override(data, d.key.split("."), copy.deepcopy(value), f"{source}: tune.search_space.{d.key}")
    if fraction is not None:
        stages = data["train"]["stages"]
        kinds = [s["kind"] for s in stages]
        if kinds != ["adapt", "finetune"]:
            raise ConfigError(
                f"{source}: tune.search_space.adapt_fraction splits the budget between two stages "
                f"[adapt, finetune]; train.stages has {kinds}"
            )
        adapt, finetune = split_epochs(int(base.tune.total_epochs), fraction, source)
        stages[1]["epochs"] = finetune
        if adapt == 0:  # pretrain-finetune: no adapt stage, no adapters
            del stages[0]
            data["model"]["adapter"]["kind"] = "none"
        else:
            stages[0]["epochs"] = adapt
    return from_dict(data, f"{source} (trial {name})")


def epoch_budget(base: Config) -> int:
    """Reports a full trial makes (one per epoch over all stages): ASHA's default max_t."""
    if base.tune.total_epochs is not None:
        return int(base.tune.total_epochs)
    return sum(s.epochs for s in base.train.stages)


def param_columns(dims: list[Dimension]) -> list[str]:
    return [d.key for d in dims if d.kind != "fixed"]


def display_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else str(value)
