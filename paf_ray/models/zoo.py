"""Checkpoint zoo: reading published checkpoint files and loading them into a backbone.

Which layouts a backbone reads, how each is renamed and which input normalisation it implies is
the backbone entry's (``models/backbones``); here is what every layout shares: reading the file
(torch with ``weights_only=True``, safetensors, and - only when trusted - detectron2 pickles and
TorchScript archives), and the one loading rule: after renaming, the only keys allowed to be
missing from the file or left over in it are the entry's classifier / projection heads; anything
else fails with the offending keys listed, so a wrong layout can never load silently as a random
backbone (docs/checkpoints.md).
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from typing import Any

import torch
from torch import nn

from paf_ray.runtime import storage

log = logging.getLogger(__name__)

# Non-tensor objects some published files carry (MoCo args, mmselfsup meta); harmless to unpickle.
_SAFE_GLOBAL_NAMES = {
    "argparse.Namespace",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.dtype",
    "collections.OrderedDict",
}


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the backbone."""


# --------------------------------------------------------------------------- reading


def is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        bad = [g for g in unsafe if g not in _SAFE_GLOBAL_NAMES]
        if bad:
            raise CheckpointError(
                f"{path}: holds objects weights_only loading refuses: {bad}; re-save its state dict "
                "with plain tensors (torch.save(ckpt['state_dict'], out))"
            ) from None
        allowed = []
        for name in unsafe:
            module, _, attr = name.rpartition(".")
            allowed.append(getattr(__import__(module, fromlist=[attr]), attr))
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)


def read_checkpoint(path: str, trust_checkpoint: bool = False) -> Any:
    """Load a checkpoint file (a local path or URI; a URI is read from this node's cache): torch
    (weights_only), .safetensors, or - when trusted - pickles/TorchScript."""
    try:
        path = storage.local_file(path)
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"model.backbone.weights: no such file {path!r}") from None
    if not os.path.isfile(path):
        raise CheckpointError(f"model.backbone.weights: no such file {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if path.endswith(".pkl"):
        if not trust_checkpoint:
            raise CheckpointError(
                f"{path}: a plain pickle (detectron2 .pkl) can run arbitrary code when loaded; "
                "set model.backbone.trust_checkpoint: true if you trust this file"
            )
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
        return obj
    if is_torchscript(path):
        if not trust_checkpoint:
            raise CheckpointError(
                f"{path}: a TorchScript archive (e.g. OpenAI's RN50.pt); use the .safetensors copy, or set "
                "model.backbone.trust_checkpoint: true to read it with torch.jit.load"
            )
        return torch.jit.load(path, map_location="cpu").state_dict()
    return _torch_load(path)


# --------------------------------------------------------------------------- loading


def _short(keys: list[str], n: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def resolve_format(entry, obj: Any, format: str, path: str) -> str:
    """The checkpoint layout: `format`, or the entry's guess from the file when "auto"."""
    fmt = entry.sniff(obj) if format == "auto" else format
    if fmt not in entry.formats:
        raise CheckpointError(f"{path}: model.backbone.format: {fmt!r} is not a layout of backbone {entry.name} "
                              f"({', '.join(entry.formats)})")
    return fmt


def load_backbone_weights(backbone: nn.Module, entry, path: str, format: str = "auto",
                          trust_checkpoint: bool = False) -> str:
    """Load a published checkpoint into `backbone` (built by `entry`); return its normalisation recipe.

    Raises CheckpointError naming the file when the file is unreadable, when a backbone key is
    missing from it, or when a non-head key is left over or has the wrong shape.
    """
    obj = read_checkpoint(path, trust_checkpoint)
    fmt = resolve_format(entry, obj, format, path)
    sd = entry.formats[fmt].convert(obj, path)
    own = backbone.state_dict()
    heads = [k for k in sd if k.startswith(entry.leftover_prefixes) and k not in own]
    sd = {k: v for k, v in sd.items() if k not in heads}
    unexpected = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own and sd[k].shape != own[k].shape]
    if unexpected or missing or mismatched:
        parts = [f"{path}: does not fit backbone {entry.name} as layout {fmt!r}{' (sniffed)' if format == 'auto' else ''}"]
        if missing:
            parts.append(f"{len(missing)} backbone keys missing: {_short(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_short(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: {_short(mismatched)}")
        raise CheckpointError("; ".join(parts) + " (a checkpoint of another backbone? model.backbone.name)")
    sd = {k: v.to(own[k].dtype) for k, v in sd.items()}
    result = backbone.load_state_dict(sd, strict=False)
    # Only BatchNorm counters may be absent (BYOL ports drop them; BN keeps its own).
    if any(not k.endswith("num_batches_tracked") for k in result.missing_keys) or result.unexpected_keys:
        raise CheckpointError(f"{path}: loading left keys missing {result.missing_keys[:8]} / unexpected "
                              f"{result.unexpected_keys[:8]}")
    log.info("loaded %s as %s (%d tensors, %d head keys dropped)", path, fmt, len(sd), len(heads))
    return entry.formats[fmt].normalization


def checkpoint_normalization(entry, path: str, format: str = "auto", trust_checkpoint: bool = False) -> str:
    """The normalisation recipe of a checkpoint file without loading it into a model."""
    return entry.formats[resolve_format(entry, read_checkpoint(path, trust_checkpoint), format, path)].normalization
