"""Checkpoint zoo: published self-supervised / supervised / CLIP checkpoints into our backbones.

Layouts and renaming rules follow ``shared/notes/checkpoints.md`` §1-3. After renaming,
the only keys allowed to be missing from the file or left over in it are the
classifier / projection heads; anything else fails with the offending keys listed, so a
wrong prefix can never load silently as a random backbone.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from typing import Any

import torch
from torch import nn

from paf_ray.data.normalize import FORMAT_NORMALIZATION

log = logging.getLogger(__name__)

# Prefixes tried in order for the torchvision-named layouts (first one any key has wins).
_PREFIXES = ("module.encoder_q.", "module.base_encoder.", "backbone.", "module.")
# Heads that may be left over after renaming (classifier, projectors, prototypes, CLIP attention pool).
_HEAD_PREFIXES = ("fc.", "head.", "heads.", "projection_head.", "projector.", "prototypes.", "predictor.", "attnpool.", "fc1000")
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


def _is_torchscript(path: str) -> bool:
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


def local_copy(uri: str) -> str:
    """A URI's file, copied once into ~/.cache/paf_ray/weights (on each node that reads it)."""
    import hashlib

    from paf_ray.data import storage

    cache = os.path.join(os.path.expanduser("~"), ".cache", "paf_ray", "weights")
    local = os.path.join(cache, hashlib.sha1(uri.encode()).hexdigest()[:12] + "-" + os.path.basename(uri.rstrip("/")))
    if not os.path.isfile(local) or os.path.getsize(local) != storage.file_size(uri):
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            raise CheckpointError(f"model.backbone.weights: no such file {uri!r}") from None
        os.makedirs(cache, exist_ok=True)
        tmp = f"{local}.{os.getpid()}.part"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
    return local


def read_checkpoint(path: str, trust_checkpoint: bool = False) -> Any:
    """Load a checkpoint file (a path or a URI): torch (weights_only), .safetensors, or - when
    trusted - pickles/TorchScript."""
    from paf_ray.data import storage

    if storage.is_uri(path):
        path = local_copy(path)
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
    if _is_torchscript(path):
        if not trust_checkpoint:
            raise CheckpointError(
                f"{path}: a TorchScript archive (e.g. OpenAI's RN50.pt); use the .safetensors copy, or set "
                "model.backbone.trust_checkpoint: true to read it with torch.jit.load"
            )
        return torch.jit.load(path, map_location="cpu").state_dict()
    return _torch_load(path)


def _tensor_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (mapping), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k] = v
        elif type(v).__module__ == "numpy" and hasattr(v, "shape"):
            out[k] = torch.as_tensor(v)
    return out


# --------------------------------------------------------------------------- layouts


def unwrap(obj: Any) -> dict:
    """The state dict inside a training checkpoint ({'state_dict': ...} / {'model': ...})."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    return obj


def sniff_format(obj: Any) -> str:
    """Guess the checkpoint layout from its keys (see notes/checkpoints.md §2)."""
    if isinstance(obj, dict) and isinstance(obj.get("resnet"), dict):
        return "simclr2"
    author = obj.get("author") if isinstance(obj, dict) else None
    sd = unwrap(obj)
    keys = list(sd) if isinstance(sd, dict) else []

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("visual.") or "token_embedding.weight" in keys or has("attnpool."):
        return "clip"
    if has("module.encoder_q."):
        return "moco"
    if has("module.base_encoder."):
        return "mocov3"
    if has("stem.conv1.") or has("res2."):
        return "detco"
    if author == "DenseCL":
        return "densecl"
    if has("backbone."):
        return "mmselfsup"
    if has("module.prototypes.") or has("module.projection_head."):
        return "swav"
    if has("module."):
        return "torchvision"
    wrapped = isinstance(obj, dict) and "state_dict" in obj
    if wrapped and "fc.weight" in keys and "fc.bias" not in keys:
        return "simclr"  # tonylins/simclr-converter never writes fc.bias
    if keys and not any(k.endswith("num_batches_tracked") for k in keys) and "fc.weight" in keys:
        return "byol"  # ajtejankar/byol-convert: torchvision names, no BN counters
    return "torchvision"


def _strip_prefix(sd: dict) -> dict:
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return dict(sd)


def _rename(sd: dict, rules: list[tuple[str, str]]) -> dict:
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


_DETECTRON2_RULES = [
    (r"^stem\.conv1\.norm\.", "bn1."),
    (r"^stem\.conv1\.", "conv1."),
    (r"^res(\d)\.", lambda m: f"layer{int(m.group(1)) - 1}."),
    (r"\.shortcut\.norm\.", ".downsample.1."),
    (r"\.shortcut\.", ".downsample.0."),
    (r"\.conv(\d)\.norm\.", r".bn\1."),
]
# detectron2 FrozenBN stores running stats as plain names too; d2 `weight/bias/running_mean/var` match BN.

_SIMCLR2_RULES = [
    (r"^net\.0\.0\.", "conv1."),
    (r"^net\.0\.1\.0\.", "bn1."),
    (r"^net\.(\d)\.blocks\.(\d+)\.", r"layer\1.\2."),
    (r"\.net\.0\.", ".conv1."),
    (r"\.net\.1\.0\.", ".bn1."),
    (r"\.net\.2\.", ".conv2."),
    (r"\.net\.3\.0\.", ".bn2."),
    (r"\.net\.4\.", ".conv3."),
    (r"\.net\.5\.0\.", ".bn3."),
    (r"\.projection\.shortcut\.", ".downsample.0."),
    (r"\.projection\.bn\.0\.", ".downsample.1."),
]


def convert(obj: Any, fmt: str, path: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Checkpoint object -> state dict in the backbone's (torchvision / open_clip visual) names."""
    if fmt == "simclr2":
        if not (isinstance(obj, dict) and isinstance(obj.get("resnet"), dict)):
            raise CheckpointError(f"{path}: format simclr2 expects {{'resnet': state_dict, 'head': ...}}")
        return _rename(_tensor_dict(obj["resnet"], path), _SIMCLR2_RULES)
    sd = _tensor_dict(unwrap(obj), path)
    if fmt == "detco":
        return _rename(sd, _DETECTRON2_RULES)
    if fmt == "clip":
        if any(k.startswith("visual.") for k in sd):
            return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        return sd
    expected = {"moco": "module.encoder_q.", "mocov3": "module.base_encoder.", "mmselfsup": "backbone."}.get(fmt)
    if expected and not any(k.startswith(expected) for k in sd):
        sample = sorted(sd)[:8]
        raise CheckpointError(f"{path}: format {fmt} expects keys under {expected!r}; found e.g. {sample}")
    return _strip_prefix(sd)


# --------------------------------------------------------------------------- loading


def _short(keys: list[str], n: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_backbone_weights(backbone: nn.Module, path: str, format: str = "auto", trust_checkpoint: bool = False) -> str:
    """Load a published checkpoint into `backbone`; return its normalisation recipe.

    Raises CheckpointError naming the file when the file is unreadable, when a backbone
    key is missing from it, or when a non-head key is left over or has the wrong shape.
    """
    obj = read_checkpoint(path, trust_checkpoint)
    fmt = sniff_format(obj) if format == "auto" else format
    if fmt not in FORMAT_NORMALIZATION:
        raise CheckpointError(f"{path}: model.backbone.format: unknown format {fmt!r}")
    sd = convert(obj, fmt, path)

    own = backbone.state_dict()
    heads = [k for k in sd if k.startswith(_HEAD_PREFIXES) and k not in own]
    sd = {k: v for k, v in sd.items() if k not in heads}
    unexpected = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    mismatched = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own and sd[k].shape != own[k].shape]
    if unexpected or missing or mismatched:
        parts = [f"{path}: does not fit backbone {type(backbone).__name__} as format {fmt!r}"
                 f"{' (sniffed)' if format == 'auto' else ''}"]
        if missing:
            parts.append(f"{len(missing)} backbone keys missing: {_short(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_short(unexpected)}")
        if mismatched:
            hint = " (a CLIP checkpoint needs backbone.name clip_rn50)" if fmt == "clip" else ""
            parts.append(f"{len(mismatched)} shape mismatches{hint}: {_short(mismatched)}")
        raise CheckpointError("; ".join(parts))

    sd = {k: v.to(own[k].dtype) for k, v in sd.items()}
    result = backbone.load_state_dict(sd, strict=False)
    # Only BatchNorm counters may be absent (BYOL ports drop them; BN keeps its own).
    assert all(k.endswith("num_batches_tracked") for k in result.missing_keys), result.missing_keys
    assert not result.unexpected_keys, result.unexpected_keys
    log.info("loaded %s as %s (%d tensors, %d head keys dropped)", path, fmt, len(sd), len(heads))
    return FORMAT_NORMALIZATION[fmt]
