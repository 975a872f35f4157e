"""fp32 vs bf16 autocast: the detection heads' box arithmetic, given the same head outputs.

`box_check` builds a detection head as the model does (Faster R-CNN or FCOS) on a random
feature pyramid of a 1280x736 batch with ground-truth boxes all over the frame, and runs a
training forward and an eval forward twice: first under bf16 autocast on bf16 features,
recording what the heads' last layers hand on (RPN objectness/deltas, box predictor
logits/deltas, FCOS logits/regression/centerness); then in plain float32 with those same
outputs put back in place by forward hooks. Everything after the head outputs is box
arithmetic, so the two runs must agree. It reports the largest difference in pixels of the
anchors, of the regression targets (each decoded against the float32 run's anchors or
proposals, i.e. the displacement of the box it encodes) and of the final boxes.

Used by tests/test_detection_precision.py (CPU autocast) and, on a GPU (CUDA autocast casts other
ops than CPU autocast), by scripts/gpu_bench.sh:

    python tests/box_check.py [--device cuda]   # JSON; exit 1 if a difference is over 0.01 px

Imports torch, torchvision and paf_ray's detection heads only.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

# The modules whose outputs the head hands to box arithmetic, per detector.
HEAD_OUTPUTS = {"faster_rcnn": ("rpn.head", "roi_heads.box_predictor"), "fcos": ("head",)}
# Box coders whose encode() makes the regression targets.
TARGET_CODERS = {"faster_rcnn": ("rpn.box_coder", "roi_heads.box_coder"), "fcos": ("head.box_coder",)}
ANCHOR_GENERATORS = {"faster_rcnn": "rpn.anchor_generator", "fcos": "anchor_generator"}
LEVEL_STRIDES = {"faster_rcnn": {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64},
                 "fcos": {"1": 8, "2": 16, "3": 32, "p6": 64, "p7": 128}}


def small_det_config(kind: str):
    """The detector at the reference anchor sizes with fewer proposals (cheap on CPU)."""
    from paf_ray.tasks.det.config import DetConfig

    return DetConfig(kind=kind, rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=300,
                     rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=300, box_batch_size_per_image=128,
                     representation_size=64, fcos_num_convs=1)


def make_inputs(kind: str, image_size=(1280, 736), batch: int = 2, channels: int = 32, boxes_per_image: int = 12,
                seed: int = 0):
    """(pyramid, images, targets): random features at the detector's levels, GT boxes across the frame."""
    g = torch.Generator().manual_seed(seed)
    w, h = image_size
    pyramid = OrderedDict((k, torch.randn(batch, channels, math.ceil(h / s), math.ceil(w / s), generator=g))
                          for k, s in LEVEL_STRIDES[kind].items())
    images = torch.zeros(batch, 3, h, w)
    boxes, labels = [], []
    for _ in range(batch):
        wh = 16 + torch.rand(boxes_per_image, 2, generator=g) * torch.tensor([300.0, 200.0])
        xy = torch.rand(boxes_per_image, 2, generator=g) * (torch.tensor([w, h]) - wh)
        xy[: boxes_per_image // 3, 0] = w - wh[: boxes_per_image // 3, 0] - 1  # a third at the right edge (x > 1024)
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(0, 10, (boxes_per_image,), generator=g))
    targets = (boxes, labels, [torch.zeros(0, 4)] * batch)
    return pyramid, images, targets


def _same_shapes(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_shapes(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same_shapes(x, y) for x, y in zip(a, b))
    return True


def _to(obj, dtype):
    if torch.is_tensor(obj):
        return obj.detach().to(dtype)
    if isinstance(obj, dict):
        return {k: _to(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, dtype) for v in obj)
    return obj


def run_head(head, kind: str, pyramid, images, targets, autocast_dtype=None, replay: dict | None = None,
             seed: int = 0) -> dict:
    """A training forward and an eval forward of `head`; returns the head outputs, anchors, encode
    calls and final boxes. With `replay`, the head outputs are replaced by the recorded ones (in
    the dtype this run's module would hand on) wherever their shapes match."""
    from torchvision.models.detection._utils import BoxLinearCoder

    device = images.device
    rec: dict = {"outputs": {n: [] for n in HEAD_OUTPUTS[kind]}, "replaced": 0, "kept": 0, "anchors": [],
                 "encoded": {n: [] for n in TARGET_CODERS[kind]}}
    handles = []
    for name in HEAD_OUTPUTS[kind]:
        def hook(module, args, output, name=name):
            calls = rec["outputs"][name]
            calls.append(_to(output, torch.float32))
            if replay is None:
                return None
            recorded = replay["outputs"][name][len(calls) - 1]
            if not _same_shapes(recorded, output):
                rec["kept"] += 1
                return None
            rec["replaced"] += 1
            dtype = next(t.dtype for t in _leaves(output))
            return _to(recorded, dtype)
        handles.append(head.get_submodule(name).register_forward_hook(hook))
    handles.append(head.get_submodule(ANCHOR_GENERATORS[kind]).register_forward_hook(
        lambda m, a, out: rec["anchors"].append(torch.cat([x.detach() for x in out]))))
    spied = []
    for name in TARGET_CODERS[kind]:
        parent, attr = name.rsplit(".", 1)
        coder = getattr(head.get_submodule(parent), attr)
        encode = coder.encode

        # the boxes a target is relative to: BoxCoder.encode(gt, anchors), BoxLinearCoder.encode(anchors, gt)
        linear = isinstance(coder, BoxLinearCoder)

        def spy(reference_boxes, proposals, encode=encode, name=name, linear=linear):
            out = encode(reference_boxes, proposals)
            anchors = reference_boxes if linear else proposals
            rec["encoded"][name].append((_to(_as_list(anchors), torch.float64), _to(_as_list(out), torch.float64)))
            return out

        coder.encode = spy
        spied.append(coder)
    try:
        enabled = autocast_dtype is not None
        ctx = lambda: torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled)  # noqa: E731
        feats = OrderedDict((k, v.to(device=device, dtype=autocast_dtype or torch.float32)) for k, v in pyramid.items())
        tgts = tuple([t.to(device) for t in part] for part in targets)
        torch.manual_seed(seed)  # the samplers draw the same anchors and proposals in both runs
        head.train()
        with ctx():
            head(feats, images, tgts)
        head.eval()
        with torch.no_grad(), ctx():
            dets = head(feats, images)
        rec["boxes"] = [d["boxes"].detach() for d in dets]
    finally:
        for h in handles:
            h.remove()
        for coder in spied:
            del coder.encode
    return rec


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _leaves(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)


def _decode(coder, codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Targets -> the boxes they encode, in float64 (no autocast on a CPU copy)."""
    from torchvision.models.detection import _utils as det_utils

    codes, boxes = codes.cpu(), boxes.cpu()
    if isinstance(coder, det_utils.BoxLinearCoder):
        return det_utils.BoxLinearCoder.decode(coder, codes, boxes)
    return det_utils.BoxCoder.decode_single(coder, codes, boxes)


def _max_px(a: list[torch.Tensor], b: list[torch.Tensor]) -> float | None:
    """Largest |a - b| over matching tensors, None when the runs did not produce the same shapes."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    diffs = [(x.double().cpu() - y.double().cpu()).abs().max().item() for x, y in zip(a, b) if x.numel()]
    return max(diffs, default=0.0)


def compare_runs(head, kind: str, low: dict, ref: dict) -> dict:
    """Differences in pixels between a reduced-precision run and the float32 run (see module doc)."""
    targets_px = {}
    for name in TARGET_CODERS[kind]:
        parent, attr = name.rsplit(".", 1)
        coder = getattr(head.get_submodule(parent), attr)
        worst: float | None = 0.0
        for (_, low_t), (ref_p, ref_t) in zip(low["encoded"][name], ref["encoded"][name]):
            d = _max_px([_decode(coder, t, p) for t, p in zip(low_t, ref_p)],
                        [_decode(coder, t, p) for t, p in zip(ref_t, ref_p)])
            worst = None if d is None or worst is None else max(worst, d)
        targets_px[name] = worst
    return {
        "anchors_px": _max_px(low["anchors"], ref["anchors"]),
        "targets_px": targets_px,
        "boxes_px": _max_px(low["boxes"], ref["boxes"]),
        "anchors_dtype": str(low["anchors"][0].dtype).replace("torch.", ""),
        "boxes_dtype": str(low["boxes"][0].dtype).replace("torch.", ""),
        "detections": sum(int(b.shape[0]) for b in low["boxes"]),
        "head_outputs_replayed": ref["replaced"],
        "head_outputs_not_replayed": ref["kept"],
    }


def box_check(device: str = "cpu", kinds=("faster_rcnn", "fcos"), image_size=(1280, 736), batch: int = 2,
              channels: int = 32, dtype=torch.bfloat16) -> dict:
    """{kind: compare_runs(...)} for a head of each kind: `dtype` autocast vs float32 on `device`."""
    from paf_ray.tasks.det.heads import DetHead

    out = {}
    for kind in kinds:
        torch.manual_seed(0)
        head = DetHead(channels, 10, small_det_config(kind)).detector.to(device)  # the detector under the task's head
        pyramid, images, targets = make_inputs(kind, image_size, batch, channels)
        images = images.to(device)
        low = run_head(head, kind, pyramid, images, targets, autocast_dtype=dtype)
        ref = run_head(head, kind, pyramid, images, targets, replay=low)
        out[kind] = compare_runs(head, kind, low, ref)
    return {"device": device, "dtype": str(dtype).replace("torch.", ""), "image_size": list(image_size),
            "batch": batch, **out}


def largest_px(result: dict) -> float | None:
    """The largest anchor, target or final-box difference over both detectors (None: shapes differed)."""
    values = [v for kind in ("faster_rcnn", "fcos") for v in (result[kind]["anchors_px"], result[kind]["boxes_px"],
                                                             *result[kind]["targets_px"].values())]
    return None if None in values else max(values)


if __name__ == "__main__":
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(description="fp32 vs bf16 autocast: the detection heads' box arithmetic")
    p.add_argument("--device", default="cpu")
    result = box_check(p.parse_args().device)
    result["largest_px"] = largest_px(result)
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["largest_px"] is not None and result["largest_px"] <= 0.01 else 1)
