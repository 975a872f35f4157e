"""Typed configuration: YAML in, validated dataclasses out, ``--set a.b=value`` overrides.

``schema.py`` holds every key (plug-ins add their sections), ``loader.py`` the generic typed-YAML
loader, ``rules.py`` the cross-field rules. An unknown key, a wrong type, a duplicate key or an
impossible combination raises :class:`ConfigError` naming the file and the key, before Ray starts.
"""

from __future__ import annotations

import copy
import os

from paf_ray.config.loader import (ConfigError, apply_override, build, dump_yaml, import_plugins, merge,
                                   parse_override, read_yaml_file, to_dict)
from paf_ray.config.rules import check_rules
from paf_ray.config.schema import (AdapterConfig, BackboneConfig, Config, DataConfig, JobConfig, LossConfig,
                                   LVAdapterConfig, ModelConfig, PretrainConfig, RayConfig, StageConfig,
                                   StudyCheckpointConfig, StudyConfig, SynthConfig, TrackingConfig, TrainConfig,
                                   TuneConfig)

# mappings whose keys are data, not schema: --set replaces them whole instead of merging into them
_OPAQUE = ("search_space", "runtime_env", "weights", "quick", "head_lr_mult")


def from_dict(data: dict | None, source: str = "<config>", overrides: list[str] | tuple[str, ...] = (),
              rules: bool = True) -> Config:
    """Build and validate a Config. `rules=False` skips the cross-field rules: for a config that was
    checked when its run started (a checkpoint's, a Ray worker's)."""
    data = copy.deepcopy(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    import_plugins(data.get("plugins"), source)
    # Overrides apply to the file merged onto the defaults, so `--set train.stages.0.lr=...`
    # works when the file does not spell the stage list out.
    if overrides:
        data = merge(to_dict(Config()), data, _OPAQUE)
        for text in overrides:
            path, value = parse_override(text)
            apply_override(data, path, value, f"--set {text}")
        source = f"{source} (with --set overrides)"
    cfg = build(Config, data, "", source)
    if rules:
        check_rules(cfg, source)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply ``--set`` overrides."""
    if path is None:
        return from_dict({}, "<defaults>", overrides)
    path = os.fspath(path)
    data = read_yaml_file(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return from_dict(data, path, overrides)


def dump_config(cfg: Config, path: str | os.PathLike | None = None) -> str:
    return dump_yaml(to_dict(cfg), path)


__all__ = ["AdapterConfig", "BackboneConfig", "Config", "ConfigError", "DataConfig", "JobConfig", "LVAdapterConfig",
           "LossConfig", "ModelConfig", "PretrainConfig", "RayConfig", "StageConfig", "StudyCheckpointConfig",
           "StudyConfig", "SynthConfig", "TrackingConfig", "TrainConfig", "TuneConfig", "apply_override", "dump_config", "from_dict",
           "load_config", "parse_override", "to_dict"]
