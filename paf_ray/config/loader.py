"""A typed YAML loader: YAML text -> checked plain data -> dataclasses, and back.

Generic: it knows dataclasses and type annotations, not paf_ray's keys (those are in schema.py).
Every problem is a :class:`ConfigError` whose one line names the file and the key (and, for what
the YAML parser sees, the line and column):

* YAML syntax errors keep their line and column; a file that is not UTF-8 is named as such; a
  tag (``!!python/object``...) is refused (safe loading); nesting too deep for the parser is an error;
* a key written twice in one mapping is an error (YAML would let the last one win silently);
* alias expansion is bounded (`MAX_ALIASES` alias uses, `MAX_NODES` nodes after expansion), so a
  small file cannot cost minutes and gigabytes;
* an unknown key, a wrong type, a non-finite number or a missing required value is an error;
  values shown in messages are cut to one short line.

Plug-in sections: a dict field whose metadata has ``sections`` (a function returning
{name: dataclass}) takes one section per plug-in name, each built with that plug-in's dataclass
(unknown names are errors, missing ones get the dataclass's defaults). With ``inline: True`` the
sections sit beside the dataclass's own keys (``model.adapter.lora.rank``), else under the field
(``model.heads.det.kind``).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import os
import types
import typing
from typing import Any, Literal, Union

import yaml

from paf_ray.runtime import files


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, missing, or the file cannot be read."""


MAX_ALIASES = 64  # alias uses in one file: real configs use a handful, if any
MAX_NODES = 200_000  # YAML nodes after alias expansion
SHOWN_CHARS = 80  # the most of a value an error message shows


def short(value: Any) -> str:
    """repr(value) cut to SHOWN_CHARS characters."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 5] + " ...)"


# --------------------------------------------------------------------------- YAML text


def _mark(node_or_mark) -> str:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return f"{mark.line + 1}:{mark.column + 1}"


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys and bounds alias use."""

    def __init__(self, stream):
        super().__init__(stream)
        self.alias_uses = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.alias_uses += 1
            if self.alias_uses > MAX_ALIASES:
                event = self.peek_event()
                raise ConfigError(f"{self.name}:{_mark(event)}: more than {MAX_ALIASES} YAML alias uses "
                                  f"(*name); a config needs a handful at most")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    break
                if first is not None:
                    raise ConfigError(f"{self.name}:{_mark(key_node)}: duplicate key {short(key)} "
                                      f"(first at line {first.start_mark.line + 1}); YAML would keep only the last")
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _count_nodes(node: yaml.Node, name: str) -> None:
    """Refuse a document that expands (through aliases) to more than MAX_NODES nodes."""
    count, stack = 0, [node]
    while stack:
        n = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ConfigError(f"{name}: the YAML expands to more than {MAX_NODES} values through its aliases")
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                stack.extend((k, v))


def parse_yaml(text: str, name: str) -> Any:
    """YAML text -> plain data, strictly (see the module docstring); `name` labels errors."""
    loader = _StrictLoader(text)
    loader.name = name
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count_nodes(node, name)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f":{_mark(mark)}" if mark is not None else ""
        raise ConfigError(f"{name}{where}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except RecursionError:  # PyYAML composes and constructs recursively
        raise ConfigError(f"{name}: not a config: its values are nested too deeply for the YAML parser") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a config file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    return parse_yaml(text, path)


# --------------------------------------------------------------------------- types


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists -> tuples...)."""

    def fail(msg: str = "") -> ConfigError:
        return ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {type(value).__name__} {short(value)}{msg}")

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except ConfigError as e:
                errors.append((arg, e))
        for arg, e in errors:  # a mapping for an optional section: its own error names the inner key
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                raise e
        raise fail()
    if origin is Literal:
        if value not in args:
            raise fail()
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return build(tp, value, key, source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail()
        return [_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail(f" (a list of {len(args)})")
        return tuple(_convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        return {_convert(k, args[0], f"{key}.{k}", source): _convert(v, args[1], f"{key}.{k}", source)
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key}: must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    raise ConfigError(f"{source}: {key}: unsupported annotation {tp!r}")


def _sections_field(cls: type) -> dataclasses.Field | None:
    for f in dataclasses.fields(cls):
        if f.metadata.get("sections") and f.metadata.get("inline"):
            return f
    return None


def _build_sections(f: dataclasses.Field, data: dict, key: str, source: str) -> dict[str, Any]:
    known = f.metadata["sections"]()
    out = {}
    for name, value in data.items():
        if name not in known:
            raise ConfigError(f"{source}: unknown key '{key}.{name}' (known here: {', '.join(sorted(known))})")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}.{name}: expected a mapping, got {type(value).__name__} {short(value)}")
        out[name] = build(known[name], value, f"{key}.{name}", source)
    for name, section in known.items():
        out.setdefault(name, section())
    return out


def build(cls: type, data: dict, prefix: str, source: str):
    """A dataclass instance from a mapping, every key and type checked."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    inline = _sections_field(cls)
    inline_known = inline.metadata["sections"]() if inline is not None else {}
    own = [n for n, f in fields.items() if f is not inline]
    inline_data = {}
    for k in data:
        if k in own:
            continue
        if k in inline_known:
            inline_data[k] = data[k]
            continue
        where = f"{prefix}.{k}" if prefix else str(k)
        raise ConfigError(f"{source}: unknown key '{where}' (known here: {', '.join(sorted([*own, *inline_known]))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if f is inline:
            kwargs[name] = _build_sections(f, inline_data, prefix, source)
        elif f.metadata.get("sections"):
            value = data.get(name) or {}
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key}: expected a mapping of sections, got {short(value)}")
            kwargs[name] = _build_sections(f, value, key, source)
        elif name in data:
            kwargs[name] = _convert(data[name], hints[name], key, source)
        elif dataclasses.is_dataclass(hints[name]):  # an absent section: its defaults, plug-in sections too
            kwargs[name] = build(hints[name], {}, key, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key '{key}'")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclasses -> plain data (tuples as lists), suitable for YAML/JSON; inline sections flattened."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = to_dict(getattr(obj, f.name))
            if f.metadata.get("inline"):
                out.update(value)
            else:
                out[f.name] = value
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(x) for k, x in obj.items()}
    return obj


# --------------------------------------------------------------------------- --set overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a', 'b', 'c'], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE (e.g. train.stages.0.epochs=2)")
    key, raw = text.split("=", 1)
    value = parse_yaml(raw, f"--set {key.strip()}") if raw != "" else ""
    return key.strip().split("."), value


def apply_override(data: dict, path: list[str], value: Any, source: str = "--set") -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                raise ConfigError(f"{source}: {where}: no list item {part!r}") from None
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{source}: {where} is a {type(node).__name__}, not a section")
    last = path[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise ConfigError(f"{source}: {'.'.join(path)}: no list item {last!r}") from None
    else:
        node[last] = value


def merge(defaults: dict, data: dict, opaque: tuple[str, ...] = ()) -> dict:
    """`data` laid over `defaults`, mapping by mapping (keys in `opaque` are replaced whole)."""
    out = copy.deepcopy(defaults)
    for k, v in data.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in opaque:
            out[k] = merge(out[k], v, opaque)
        else:
            out[k] = copy.deepcopy(v)
    return out


def import_plugins(modules: Any, source: str) -> None:
    """Import the modules a config's `plugins:` names: each registers its tasks, backbones or adapters."""
    if modules is None:
        return
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ConfigError(f"{source}: plugins: expected a list of module names, got {short(modules)}")
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except Exception as e:  # the plug-in's own error, on one line
            raise ConfigError(f"{source}: plugins[{i}]: cannot import {name!r}: {type(e).__name__}: {e}") from None


def dump_yaml(data: dict, path: str | os.PathLike | None = None) -> str:
    """YAML text of `data`; also written whole to `path` (a local path or URI) if given."""
    text = yaml.safe_dump(data, sort_keys=False)
    if path is not None:
        files.write_text(os.fspath(path), text)
    return text
