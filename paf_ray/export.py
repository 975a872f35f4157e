"""`paf-ray export CKPT --format torchscript|onnx --out FILE`: the deployable model.

The exported graph takes one frame of a fixed size (default 1280x720), uint8 ``[1, 3, H, W]``
RGB, and does everything a deployment needs: the letterbox to the network input size, the
network (LoRA adapters already merged by ``load_model``; the LV-Adapter's class embeddings,
computed once in eval mode, are traced in as constants), and the mapping back to the frame:

    (boxes [N, 4] x1y1x2y2 frame pixels, scores [N], labels [N] int64 indices of DET_CLASSES,
     sem_logits [1, 19, H, W], drv_logits [1, 3, H, W])

(a task the model lacks gives empty tensors). A TorchScript file needs torchvision's ops
registered to load (``import torchvision`` before ``torch.jit.load``). After writing the file, both the PyTorch module
and the exported file run on one sample frame and must agree within ``TOLERANCE``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from paf_ray.data.bdd100k import IMAGE_HEIGHT, IMAGE_WIDTH, NUM_CLASSES

# Largest allowed |exported - PyTorch| on the sample: logits, box coordinates (frame pixels), scores.
TOLERANCE = {"logits": 1e-3, "boxes": 1e-2, "scores": 1e-4}
OUTPUT_NAMES = ("boxes", "scores", "labels", "sem_logits", "drv_logits")


class DeployableModel(nn.Module):
    """Frame in, frame-resolution outputs out, with the letterbox and its inverse inside the graph."""

    def __init__(self, model: nn.Module, tasks, input_size: tuple[int, int], frame_size: tuple[int, int]):
        super().__init__()
        self.model = model
        self.tasks = tuple(tasks)
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
        device = frame.device
        if "det" in outputs:
            det = outputs["det"][0]
            boxes = det["boxes"] / self.scale
            boxes = torch.stack(
                [
                    boxes[:, 0].clamp(0, self.frame_w),
                    boxes[:, 1].clamp(0, self.frame_h),
                    boxes[:, 2].clamp(0, self.frame_w),
                    boxes[:, 3].clamp(0, self.frame_h),
                ],
                dim=1,
            )
            scores, labels = det["scores"], det["labels"].to(torch.int64)
        else:
            boxes = torch.zeros((0, 4), device=device)
            scores = torch.zeros((0,), device=device)
            labels = torch.zeros((0,), dtype=torch.int64, device=device)
        maps = []
        for task in ("sem", "drv"):
            if task in outputs:
                logits = outputs[task][:, :, : self.content_h, : self.content_w].float()
                maps.append(F.interpolate(logits, size=(self.frame_h, self.frame_w), mode="bilinear", align_corners=False))
            else:
                maps.append(torch.zeros((1, NUM_CLASSES[task], 0, 0), device=device))
        return boxes.float(), scores.float(), labels, maps[0], maps[1]


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
        from PIL import Image

        from paf_ray.predict import read_image

        image = np.asarray(Image.fromarray(read_image(path)).resize((w, h), Image.BILINEAR))
    else:
        rng = np.random.default_rng(0)
        image = np.zeros((h, w, 3), np.uint8)
        image[: h // 2] = (135, 170, 210)  # sky
        image[h // 2 :] = (90, 90, 95)  # road
        image += rng.integers(0, 30, size=image.shape, dtype=np.uint8)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None]


def compare_outputs(reference, exported) -> dict[str, float]:
    """Max |difference| per output group; raises ValueError when shapes or detections differ."""
    ref = [torch.as_tensor(np.asarray(r)) for r in reference]
    exp = [torch.as_tensor(np.asarray(e)) for e in exported]
    for name, r, e in zip(OUTPUT_NAMES, ref, exp):
        if tuple(r.shape) != tuple(e.shape):
            raise ValueError(f"output {name}: shape {tuple(e.shape)} from the exported model, {tuple(r.shape)} from PyTorch")
    if not torch.equal(ref[2], exp[2].to(ref[2].dtype)):
        raise ValueError("output labels: the exported model predicts other classes than PyTorch")

    def maxdiff(a, b):
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0

    return {
        "boxes": maxdiff(ref[0], exp[0]),
        "scores": maxdiff(ref[1], exp[1]),
        "logits": max(maxdiff(ref[3], exp[3]), maxdiff(ref[4], exp[4])),
    }


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
            output_names=list(OUTPUT_NAMES),
            opset_version=17,
            dynamo=False,
        )
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"frame": sample.numpy()})


def export_model(
    checkpoint: str,
    out: str,
    fmt: str = "torchscript",
    frame_size: tuple[int, int] = (IMAGE_WIDTH, IMAGE_HEIGHT),
    sample: str | None = None,
) -> dict[str, Any]:
    """Export `checkpoint` to `out` and check it against PyTorch; returns the check report.

    Raises ValueError when the exported outputs differ from PyTorch beyond ``TOLERANCE``.
    """
    from paf_ray.models.adapters import has_lora, merge_lora
    from paf_ray.train.checkpoint import load_model

    model, cfg, meta = load_model(checkpoint, device="cpu")
    module = DeployableModel(model, cfg.model.tasks, tuple(cfg.data.input_size), frame_size).eval()
    frame = sample_frame(sample, frame_size)
    with torch.no_grad():
        reference = _tensors(module(frame))  # the model as trained: LoRA unmerged, text side live
        merged_now = merge_lora(model.backbone) if has_lora(model.backbone) else 0
        baked = bake_class_embeddings(model)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        exported = (export_torchscript if fmt == "torchscript" else export_onnx)(module, frame, out)
    diffs = compare_outputs(reference, exported)
    report = {
        "format": fmt,
        "path": os.path.abspath(out),
        "frame_size": list(frame_size),
        "input_size": list(cfg.data.input_size),
        "tasks": list(cfg.model.tasks),
        "adapters_merged": bool(meta.get("adapters_merged", False)) or merged_now > 0,
        "lora_convs_merged_at_export": int(merged_now),
        "lv_adapter": bool(cfg.model.lv_adapter.enabled),
        "class_embeddings_baked": baked,
        "detections_on_sample": int(reference[0].shape[0]),
        "max_abs_diff": diffs,
        "tolerance": dict(TOLERANCE),
    }
    over = {k: v for k, v in diffs.items() if v > TOLERANCE[k]}
    if over:
        raise ValueError(f"{out}: exported outputs differ from PyTorch beyond the tolerance: {over} > {TOLERANCE}")
    return report


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--frame-size {text!r}: expected WxH, e.g. 1280x720") from None
    return w, h


def export_command(args) -> int:
    try:
        report = export_model(
            args.checkpoint,
            args.out,
            fmt=args.format,
            frame_size=_parse_size(getattr(args, "frame_size", f"{IMAGE_WIDTH}x{IMAGE_HEIGHT}")),
            sample=getattr(args, "sample", None),
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"paf-ray export: {e}", file=sys.stderr)
        return 1
    diffs = ", ".join(f"{k} {v:.2e} (tol {TOLERANCE[k]:g})" for k, v in report["max_abs_diff"].items())
    print(f"exported {report['format']} -> {report['path']}")
    print(f"  input: uint8 [1, 3, {report['frame_size'][1]}, {report['frame_size'][0]}] RGB frame; "
          f"network input {report['input_size'][0]}x{report['input_size'][1]}")
    print(f"  outputs: {', '.join(OUTPUT_NAMES)}")
    print(f"  check vs PyTorch on one sample ({report['detections_on_sample']} detections): max |diff| {diffs}: OK")
    if getattr(args, "json", False):
        print(json.dumps(report))
    return 0
