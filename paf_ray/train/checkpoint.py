"""The checkpoint layout, in one place.

A checkpoint is a directory:

    model.pt        the model state dict (DDP wrapper removed)
    train_state.pt  optimizer, scheduler, epoch, step, stage index (absent in exported/final-only dirs)
    config.yaml     the resolved config the model was built from
    meta.json       stage, epoch, step, adapters_merged, normalization, clip_activation, metrics

Everything loads with ``torch.load(..., weights_only=True)``. A run directory
(``<storage>/<name>``, holding ``summary.json``) is accepted wherever a checkpoint is,
and resolves to the run's final checkpoint. Each of these may be a local path or a URI
(``file://``, ``s3://``, ``gs://``); a checkpoint on object storage is read from a copy in
this node's cache (``paf_ray.runtime.storage.local_dir``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
from typing import Any

import torch

from paf_ray.config import Config, ConfigError, dump_config, from_dict, to_dict
from paf_ray.config.loader import read_yaml_file
from paf_ray.models.multitask import build_model
from paf_ray.models.stages import finish_stage
from paf_ray.runtime import storage
from paf_ray.runtime.files import read_json, write_bytes, write_text

MODEL_FILE = "model.pt"
TRAIN_STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the reason."""


def load_tensors(path: str, device: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; a file holding more than tensors is refused in one line.

    Nothing in such a file runs: torch stops at the first object that is not plain data.
    """
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        if not any(sign in str(e) for sign in ("Unsupported operand", "invalid load key")):  # else: random bytes
            raise CheckpointError(
                f"{path}: refused: it holds Python objects besides tensors, which weights-only loading does not "
                "run (it may carry code); save a plain state dict instead"
            ) from e
        raise CheckpointError(f"{path}: corrupt, not a torch file (its bytes are no pickle torch reads)") from e
    except Exception as e:  # a cut or corrupt file: torch's own message names no file
        raise CheckpointError(f"{path}: corrupt or cut short, not a torch file ({_first_line(e)})") from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:100]}" if text else type(error).__name__


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def save_checkpoint(
    directory: str,
    model: torch.nn.Module,
    cfg: Config,
    meta: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> str:
    os.makedirs(directory, exist_ok=True)
    net = unwrap(model)
    meta = dict(meta)
    meta.setdefault("adapters_merged", bool(getattr(net, "adapters_merged", False)))
    # the input normalisation the weights expect: a checkpoint must not depend on the
    # pretrained file it started from still being around to be sniffed
    meta.setdefault("normalization", getattr(net, "normalization", None))
    lv = getattr(net, "lv_adapter", None)
    if lv is not None:  # the text tower's activation is no parameter: it travels here, like normalization
        meta.setdefault("clip_activation", lv.text_encoder.activation)
    # each file whole or not at all (runtime/files.py); meta.json last: a folder with it is complete
    write_bytes(os.path.join(directory, MODEL_FILE), _torch_bytes(net.state_dict()))
    if train_state is not None:
        write_bytes(os.path.join(directory, TRAIN_STATE_FILE), _torch_bytes(train_state))
    write_text(os.path.join(directory, CONFIG_FILE), dump_config(cfg))
    write_text(os.path.join(directory, META_FILE), json.dumps(meta, indent=2, default=float))
    return directory


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def checkpoint_location(path: str) -> str:
    """Where a checkpoint lives, without fetching it: a checkpoint dir, a run dir (summary.json ->
    its checkpoint) or a model.pt file, as a local path or URI -> the checkpoint dir (an absolute
    local path, or a URI for object storage)."""
    path = os.path.expanduser(path)
    path = path.rstrip("/") if storage.is_remote(path) else storage.local_path(path)
    if os.path.basename(path) == MODEL_FILE and not storage.is_dir(path):
        path = os.path.dirname(path)
    if storage.exists(storage.join(path, MODEL_FILE)):
        return path
    summary = read_json(storage.join(path, "summary.json"))  # a run folder
    if summary is not None:
        ckpt = summary.get("checkpoint") if isinstance(summary, dict) else None
        if isinstance(ckpt, str) and ckpt:
            return checkpoint_location(ckpt)
    raise FileNotFoundError(
        f"{path}: not a paf_ray checkpoint (expected {MODEL_FILE}, {CONFIG_FILE}, {META_FILE} "
        "or a run folder with summary.json)"
    )


def resolve_checkpoint_dir(path: str) -> str:
    """A checkpoint dir, a run dir or a model.pt file (local or URI) -> a local checkpoint dir."""
    return storage.local_dir(checkpoint_location(path))


def read_meta(directory: str) -> dict[str, Any]:
    """meta.json of a checkpoint; CheckpointError naming the file when it is missing or not a JSON object."""
    path = os.path.join(directory, META_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a paf_ray checkpoint folder?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt (expected a JSON object, got {type(meta).__name__})")
    return meta


def read_config(directory: str) -> Config:
    """config.yaml of a checkpoint, read with the strict loader (a YAML tag or any non-plain value is an
    error naming the file), types checked; its rules were checked when its run started."""
    path = os.path.join(directory, CONFIG_FILE)
    data = read_yaml_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return from_dict(data, path, rules=False)


def read_train_state(directory: str, device: str | torch.device = "cpu") -> dict[str, Any] | None:
    path = os.path.join(directory, TRAIN_STATE_FILE)
    if not os.path.exists(path):
        return None
    return load_tensors(path, device)


def load_model_state(model: torch.nn.Module, directory: str, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint's weights into `model` (merging LoRA first if the checkpoint was merged)."""
    meta = read_meta(directory)
    net = unwrap(model)
    if meta.get("normalization"):
        net.normalization = meta["normalization"]
    if meta.get("clip_activation") and hasattr(net, "lv_adapter"):
        net.lv_adapter.text_encoder.set_activation(meta["clip_activation"])
    if meta.get("adapters_merged"):
        finish_stage(net, "adapt", merge_adapters=True)
    path = os.path.join(directory, MODEL_FILE)
    state = load_tensors(path, device)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict (a {type(state).__name__})")
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # tensors of another shape: torch lists them all, over many lines
        mismatched = [line.strip() for line in str(e).splitlines() if "size mismatch for" in line]
        first = mismatched[0][:200] if mismatched else str(e)[:200]
        raise CheckpointError(f"{path}: does not match the model built from its config: {len(mismatched)} tensor(s) "
                              f"of another shape (first: {first})") from None
    problems = [k for k in result.missing_keys] + [k for k in result.unexpected_keys]
    if problems:
        raise CheckpointError(
            f"{directory}/{MODEL_FILE}: does not match the model built from its config: "
            f"{len(result.missing_keys)} missing (first {result.missing_keys[:5]}), "
            f"{len(result.unexpected_keys)} unexpected (first {result.unexpected_keys[:5]})")
    return meta


def load_model(path: str, device: str | torch.device = "cpu", overrides: list[str] | tuple[str, ...] = ()):
    """Rebuild the model of a checkpoint for inference: (model in eval mode, cfg, meta)."""
    directory = resolve_checkpoint_dir(path)
    cfg = read_config(directory)
    if overrides:
        cfg = from_dict(to_dict(cfg), os.path.join(directory, CONFIG_FILE), overrides)
    model = build_model(cfg.model, input_size=cfg.data.input_size, load_weights=False)
    meta = load_model_state(model, directory, device)
    model.to(device).eval()
    meta["path"] = directory
    return model, cfg, meta
