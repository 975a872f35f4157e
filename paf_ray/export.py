"""`paf-ray export CKPT --format torchscript|onnx --out FILE`: the deployable model.

The exported graph takes one frame of a fixed size (default 1280x720), uint8 ``[1, 3, H, W]``
RGB, and does everything a deployment needs: the letterbox to the network input size, the
network (LoRA adapters already merged by ``load_model``; the LV-Adapter's class embeddings,
computed once in eval mode, are traced in as constants), and the mapping back to the frame.
Its outputs are each task's (``Task.export_outputs``), in the model's task order: for the paper's
three tasks

    (boxes [N, 4] x1y1x2y2 frame pixels, scores [N], labels [N] int64 class indices,
     sem_logits [1, 19, H, W], drv_logits [1, 3, H, W])

and ``lane_logits [1, 13, H, W]`` (category or no lane, direction, style) for lane marking; the
check report names them (``outputs``). A TorchScript file needs torchvision's ops
registered to load (``import torchvision`` before ``torch.jit.load``). After writing the file, both the PyTorch module
and the exported file run on one sample frame and must agree within ``TOLERANCE``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from paf_ray.data.bdd100k import IMAGE_HEIGHT, IMAGE_WIDTH
from paf_ray.predict import read_image
from paf_ray.runtime import files, storage
from paf_ray.tasks import ordered
from paf_ray.tasks.base import FrameMap
from paf_ray.train.checkpoint import load_model

# Largest allowed |exported - PyTorch| on the sample, by kind of output: logits, box coordinates
# (frame pixels), scores; labels must be equal.
TOLERANCE = {"logits": 1e-3, "boxes": 1e-2, "scores": 1e-4}


def output_names(tasks) -> list[str]:
    """The deployable model's outputs, in order, and (export_kinds) what each one is."""
    return [name for t in tasks for name in t.export_kinds]


class DeployableModel(nn.Module):
    """Frame in, frame-resolution outputs out, with the letterbox and its inverse inside the graph."""

    def __init__(self, model: nn.Module, tasks, input_size: tuple[int, int], frame_size: tuple[int, int]):
        super().__init__()
        self.model = model
        self.tasks = list(tasks)
        self.input_w, self.input_h = (int(v) for v in input_size)
        self.frame_w, self.frame_h = (int(v) for v in frame_size)
        self.scale = min(self.input_w / self.frame_w, self.input_h / self.frame_h)
        self.content_w = min(self.input_w, max(1, round(self.frame_w * self.scale)))
        self.content_h = min(self.input_h, max(1, round(self.frame_h * self.scale)))

    def _resize_frame(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.frame_h / self.content_h, self.frame_w / self.content_w
        if kh == kw and kh == int(kh) and kh > 1:
            # Whole-number shrink: a box filter, anti-aliased and exportable everywhere.
            return F.avg_pool2d(x, kernel_size=int(kh), stride=int(kh))
        return F.interpolate(x, size=(self.content_h, self.content_w), mode="bilinear", align_corners=False)

    def forward(self, frame: torch.Tensor):
        x = self._resize_frame(frame.float())
        x = F.pad(x, (0, self.input_w - self.content_w, 0, self.input_h - self.content_h))
        outputs = self.model(x.round().clamp(0, 255).to(torch.uint8))
        frame_map = FrameMap(self.scale, (self.content_h, self.content_w), (self.frame_h, self.frame_w))
        out = []
        for task in self.tasks:
            out += list(task.export_outputs(outputs[task.name], frame_map).values())
        return tuple(out)


def bake_class_embeddings(model: nn.Module) -> bool:
    """Replace the LV-Adapter's text side by its class embeddings, stored as buffers.

    The prompt context and the frozen text encoder only ever produce these embeddings; at
    inference they are fixed, so the export keeps the [K, D] tensors and drops the text tower
    (for CLIP RN50, ~63M parameters). Mutates `model`; True if it had an LV-Adapter.
    """
    lv = getattr(model, "lv_adapter", None)
    if lv is None:
        return False
    with torch.no_grad():
        text = {t: e.detach().clone() for t, e in lv.class_embeddings().items()}
    baked = nn.Module()
    for task, embedding in text.items():
        baked.register_buffer(task, embedding)
    lv.baked_class_embeddings = baked
    lv.class_embeddings = lambda: {task: getattr(baked, task) for task in text}  # shadows the method
    for name in ("text_encoder", "prompts"):
        if hasattr(lv, name):
            delattr(lv, name)
    return True


def sample_frame(path: str | None, frame_size: tuple[int, int]) -> torch.Tensor:
    """The check sample: an image file resized to the frame size, or a fixed synthetic road scene."""
    w, h = frame_size
    if path:
        image = np.asarray(Image.fromarray(read_image(path)).resize((w, h), Image.BILINEAR))
    else:
        rng = np.random.default_rng(0)
        image = np.zeros((h, w, 3), np.uint8)
        image[: h // 2] = (135, 170, 210)  # sky
        image[h // 2 :] = (90, 90, 95)  # road
        image += rng.integers(0, 30, size=image.shape, dtype=np.uint8)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None]


def compare_outputs(reference, exported, names: list[str], kinds: dict[str, str]) -> dict[str, float]:
    """Max |difference| per kind of output; ValueError when shapes or predicted labels differ."""
    ref = [torch.as_tensor(np.asarray(r)) for r in reference]
    exp = [torch.as_tensor(np.asarray(e)) for e in exported]
    diffs: dict[str, float] = {}
    for name, r, e in zip(names, ref, exp):
        if tuple(r.shape) != tuple(e.shape):
            raise ValueError(f"output {name}: shape {tuple(e.shape)} from the exported model, {tuple(r.shape)} from PyTorch")
        if kinds[name] == "labels":
            if not torch.equal(r, e.to(r.dtype)):
                raise ValueError(f"output {name}: the exported model predicts other classes than PyTorch")
            continue
        diff = float((r.float() - e.float()).abs().max()) if r.numel() else 0.0
        diffs[kinds[name]] = max(diffs.get(kinds[name], 0.0), diff)
    return diffs


def _tensors(outputs) -> list[np.ndarray]:
    return [o.detach().cpu().numpy() for o in outputs]


def export_torchscript(module: DeployableModel, sample: torch.Tensor, path: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python values (fixed frame size) are expected
        traced = torch.jit.trace(module, (sample,), check_trace=False, strict=False)
    traced.save(path)
    loaded = torch.jit.load(path, map_location="cpu")
    with torch.no_grad():
        return _tensors(loaded(sample))


def export_onnx(module: DeployableModel, sample: torch.Tensor, path: str):
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (sample,),
            path,
            input_names=["frame"],
            output_names=output_names(module.tasks),
            opset_version=17,
            dynamo=False,
        )
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"frame": sample.numpy()})


def export_model(checkpoint: str, out: str, fmt: str = "torchscript",
                 frame_size: tuple[int, int] = (IMAGE_WIDTH, IMAGE_HEIGHT), sample: str | None = None) -> dict[str, Any]:
    """Export `checkpoint` to `out` (a path or URI, written whole once the check passed) and check it
    against PyTorch; returns the check report.

    Raises ValueError when the exported outputs differ from PyTorch beyond ``TOLERANCE``.
    """
    model, cfg, meta = load_model(checkpoint, device="cpu")
    tasks = ordered(cfg.model.tasks)
    names = output_names(tasks)
    kinds = {name: kind for t in tasks for name, kind in t.export_kinds.items()}
    module = DeployableModel(model, tasks, tuple(cfg.data.input_size), frame_size).eval()
    frame = sample_frame(sample, frame_size)
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, os.path.basename(out.rstrip("/")) or "model")
        with torch.no_grad():
            reference = _tensors(module(frame))  # the model as trained: LoRA unmerged, text side live
            merged_now = not model.adapters_merged and model.adapter.finish(model)
            baked = bake_class_embeddings(model)
            exported = (export_torchscript if fmt == "torchscript" else export_onnx)(module, frame, local)
        diffs = compare_outputs(reference, exported, names, kinds)
        over = {k: v for k, v in diffs.items() if v > TOLERANCE[k]}
        if over:
            raise ValueError(f"{out}: exported outputs differ from PyTorch beyond the tolerance: {over} > {TOLERANCE}")
        with open(local, "rb") as f:
            files.write_bytes(out, f.read())
    first = {name: r for name, r in zip(names, reference)}
    return {
        "format": fmt,
        "path": out if storage.is_uri(out) else os.path.abspath(out),
        "frame_size": list(frame_size),
        "input_size": list(cfg.data.input_size),
        "tasks": [t.name for t in tasks],
        "outputs": names,
        "adapters_merged": bool(meta.get("adapters_merged", False)) or bool(merged_now),
        "adapters_merged_at_export": bool(merged_now),
        "lv_adapter": bool(cfg.model.lv_adapter.enabled),
        "class_embeddings_baked": baked,
        "detections_on_sample": int(first["boxes"].shape[0]) if "boxes" in first else None,
        "max_abs_diff": diffs,
        "tolerance": dict(TOLERANCE),
    }


def print_report(report: dict) -> None:
    diffs = ", ".join(f"{k} {v:.2e} (tol {TOLERANCE[k]:g})" for k, v in report["max_abs_diff"].items())
    print(f"exported {report['format']} -> {report['path']}")
    print(f"  input: uint8 [1, 3, {report['frame_size'][1]}, {report['frame_size'][0]}] RGB frame; "
          f"network input {report['input_size'][0]}x{report['input_size'][1]}")
    print(f"  outputs: {', '.join(report['outputs'])}")
    print(f"  check vs PyTorch on one sample: max |diff| {diffs}: OK")
