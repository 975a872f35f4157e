"""Inference: a predictor for notebooks, and `paf-ray predict` writing overlays and official-format outputs.

``load_predictor(checkpoint).predict(image)`` returns, at the image's own resolution,
``{"boxes" (N, 4) x1y1x2y2, "scores" (N,), "labels" (N,) indices of DET_CLASSES,
"sem" (H, W) uint8 train ids, "drv" (H, W) uint8 0 direct / 1 alternative / 2 background}``
(``sem``/``drv``/det entries are None / empty for tasks the model does not have).

``paf-ray predict CKPT INPUTS... --out DIR`` writes, per image, ``DIR/overlay/<stem>.png``,
``DIR/sem/<stem>.png`` and ``DIR/drv/<stem>.png`` (official ids, original resolution) and one
``DIR/det.json`` in the BDD100K format -- what ``paf-ray score`` and the official toolkit read.
With ``--distributed`` the same outputs come from Ray Data batch inference (an actor pool
that holds the model).
"""

from __future__ import annotations

import glob
import io
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from paf_ray.data.bdd100k import DET_CLASSES

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class PredictInputError(ValueError):
    """An input path or image cannot be used."""


# --------------------------------------------------------------------------- inputs


def resolve_inputs(inputs: Sequence[str]) -> list[str]:
    """Image files, folders (their images, not recursive) and glob patterns -> sorted unique paths.
    A file or folder may be a URI (s3://, gs://, file://); globs are local."""
    from paf_ray.data import storage

    paths: list[str] = []
    for item in inputs:
        if storage.is_remote(item):
            if storage.is_dir(item):
                found = [storage.join(item, n) for n in storage.list_files(item) if n.lower().endswith(IMAGE_EXTENSIONS)]
                if not found:
                    raise PredictInputError(f"{item}: folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
            elif storage.exists(item):
                found = [item.rstrip("/")]
            else:
                raise PredictInputError(f"{item}: no such image file or folder")
            paths.extend(found)
            continue
        item = storage.local_path(item) if item.startswith("file://") else item
        if os.path.isdir(item):
            found = [os.path.join(item, n) for n in sorted(os.listdir(item)) if n.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                raise PredictInputError(f"{item}: folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise PredictInputError(f"{item}: no such image file, folder, or glob match")
        paths.extend(os.path.abspath(p) for p in found)
    paths = sorted(dict.fromkeys(paths))
    stems: dict[str, str] = {}
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        if stem in stems:
            raise PredictInputError(f"{p} and {stems[stem]}: same file stem, their outputs would overwrite each other")
        stems[stem] = p
    return paths


def read_image(source: str | bytes, name: str | None = None) -> np.ndarray:
    """An image file (path or its bytes) as RGB uint8 (H, W, 3)."""
    where = name or (source if isinstance(source, str) else "<bytes>")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as e:
        raise PredictInputError(f"{where}: cannot read the image: {e}") from None


def letterbox(image: np.ndarray, input_size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The val transform's letterbox (content top-left, zero pad) -> (canvas (H, W, 3) uint8, scale),
    scale = network-input pixels per original pixel."""
    from paf_ray.data.transforms import val_transform

    row = val_transform({"image": image}, input_size)
    return row["image"], float(row["scale"])


def _to_original(logits: torch.Tensor, scale: float, orig_hw: tuple[int, int]) -> np.ndarray:
    """[C, H_in, W_in] logits -> (h, w) uint8 ids at the original size (padding cropped, bilinear up, argmax)."""
    h, w = orig_hw
    hc = min(logits.shape[-2], max(1, round(h * scale)))
    wc = min(logits.shape[-1], max(1, round(w * scale)))
    content = logits[None, :, :hc, :wc].float()
    up = F.interpolate(content, size=(h, w), mode="bilinear", align_corners=False)
    return up[0].argmax(0).to(torch.uint8).cpu().numpy()


# --------------------------------------------------------------------------- predictor


@dataclass
class Predictor:
    """A model loaded for inference; ``predict(image)`` gives results at the image's resolution."""

    model: torch.nn.Module
    cfg: Any
    meta: dict = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    score_thr: float = 0.0

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.cfg.model.tasks)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.cfg.data.input_size)

    def predict(self, image: np.ndarray | str, score_thr: float | None = None) -> dict[str, Any]:
        """One RGB uint8 (H, W, 3) array or image path -> boxes, scores, labels, sem, drv (original size)."""
        return self.predict_batch([image], score_thr)[0]

    @torch.no_grad()
    def predict_batch(self, images: Sequence[np.ndarray | str], score_thr: float | None = None) -> list[dict]:
        thr = self.score_thr if score_thr is None else score_thr
        arrays = [read_image(im) if isinstance(im, str) else np.asarray(im) for im in images]
        for i, a in enumerate(arrays):
            if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
                raise PredictInputError(f"image {i}: expected RGB uint8 (H, W, 3), got {a.dtype} {a.shape}")
        boxed = [letterbox(a, self.input_size) for a in arrays]
        batch = torch.from_numpy(np.stack([b[0] for b in boxed])).permute(0, 3, 1, 2).contiguous().to(self.device)
        outputs = self.model(batch)
        results = []
        for i, (array, (_, scale)) in enumerate(zip(arrays, boxed)):
            h, w = array.shape[:2]
            result: dict[str, Any] = {
                "boxes": np.zeros((0, 4), np.float32),
                "scores": np.zeros((0,), np.float32),
                "labels": np.zeros((0,), np.int64),
                "sem": None,
                "drv": None,
            }
            if "det" in outputs:
                det = outputs["det"][i]
                keep = det["scores"] >= thr
                boxes = det["boxes"][keep].float().cpu().numpy() / scale
                boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
                boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
                result["boxes"] = boxes.astype(np.float32)
                result["scores"] = det["scores"][keep].float().cpu().numpy().astype(np.float32)
                result["labels"] = det["labels"][keep].cpu().numpy().astype(np.int64)
            for task in ("sem", "drv"):
                if task in outputs:
                    result[task] = _to_original(outputs[task][i], scale, (h, w))
            results.append(result)
        return results


def load_predictor(checkpoint: str, device: str = "cpu", score_thr: float = 0.0) -> Predictor:
    """Load a paf_ray checkpoint (dir, run dir or model.pt) as a :class:`Predictor` (adapters merged)."""
    from paf_ray.train.checkpoint import load_model

    device = resolve_device(device)
    model, cfg, meta = load_model(checkpoint, device=device)
    model.eval()
    return Predictor(model=model, cfg=cfg, meta=meta, device=torch.device(device), score_thr=score_thr)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# --------------------------------------------------------------------------- outputs


def det_frame(name: str, pred: dict) -> dict:
    """One BDD100K/Scalabel prediction frame: {name, labels: [{id, category, score, box2d}]}."""
    labels = []
    for j, (box, score, label) in enumerate(zip(pred["boxes"], pred["scores"], pred["labels"])):
        x1, y1, x2, y2 = (float(v) for v in box)
        labels.append(
            {
                "id": str(j),
                "category": DET_CLASSES[int(label)],
                "score": float(score),
                "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
            }
        )
    return {"name": name, "labels": labels}


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def render_outputs(image: np.ndarray, pred: dict) -> dict[str, bytes]:
    """PNG bytes of the overlay and of the sem/drv masks (only the tasks predicted)."""
    from paf_ray.viz import overlay

    files = {
        "overlay": _png_bytes(
            overlay(image, sem=pred["sem"], drv=pred["drv"], boxes=pred["boxes"], labels=pred["labels"], scores=pred["scores"])
        )
    }
    for task in ("sem", "drv"):
        if pred[task] is not None:
            files[task] = _png_bytes(pred[task])
    return files


def write_files(out_dir: str, stem: str, files: dict[str, bytes]) -> None:
    for kind, data in files.items():
        folder = os.path.join(out_dir, kind)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{stem}.png"), "wb") as f:
            f.write(data)


def write_det_json(out_dir: str, frames: Iterable[dict]) -> str:
    path = os.path.join(out_dir, "det.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(sorted(frames, key=lambda fr: fr["name"]), f)
    return path


def predict_files(predictor: Predictor, paths: Sequence[str], out_dir: str, batch_size: int = 4) -> list[dict]:
    """Predict `paths` (local paths or URIs) in this process and write all outputs; returns the det frames."""
    from paf_ray.data import storage

    os.makedirs(out_dir, exist_ok=True)
    frames = []
    for start in range(0, len(paths), max(1, batch_size)):
        chunk = paths[start : start + max(1, batch_size)]
        images = [read_image(storage.read_bytes(p), name=p) if storage.is_remote(p) else read_image(p) for p in chunk]
        for path, image, pred in zip(chunk, images, predictor.predict_batch(images)):
            name = os.path.basename(path)
            write_files(out_dir, os.path.splitext(name)[0], render_outputs(image, pred))
            frames.append(det_frame(name, pred))
    if "det" in predictor.tasks:
        write_det_json(out_dir, frames)
    return frames


# --------------------------------------------------------------------------- Ray Data batch inference


class RayPredictWorker:
    """Ray Data actor: holds the model; maps a batch of image files to rendered outputs (PNG bytes)."""

    def __init__(self, checkpoint: str, device: str, score_thr: float):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.predictor = load_predictor(checkpoint, device=device, score_thr=score_thr)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        images = [read_image(bytes(b), name=p) for b, p in zip(batch["bytes"], paths)]
        preds = self.predictor.predict_batch(images)
        out: dict[str, list] = {"name": [], "det": [], "overlay": [], "sem": [], "drv": []}
        for path, image, pred in zip(paths, images, preds):
            name = os.path.basename(path)
            files = render_outputs(image, pred)
            out["name"].append(name)
            out["det"].append(json.dumps(det_frame(name, pred)))
            for kind in ("overlay", "sem", "drv"):
                out[kind].append(files.get(kind, b""))
        return {k: np.array(v, dtype=object) for k, v in out.items()}


def predict_distributed(
    checkpoint: str,
    paths: Sequence[str],
    out_dir: str,
    batch_size: int = 4,
    workers: int = 1,
    device: str = "auto",
    score_thr: float = 0.0,
    address: str | None = None,
) -> list[dict]:
    """Batch inference with Ray Data: read the files, an actor pool of `workers` models, write outputs here."""
    import ray

    from paf_ray.train.checkpoint import checkpoint_location, read_config, resolve_checkpoint_dir
    from paf_ray.train.ray_setup import configure_data_context, init_ray

    # absolute path or URI: the actors do not share our working directory (nor, on other nodes, our cache)
    checkpoint = checkpoint_location(checkpoint)
    tasks = read_config(resolve_checkpoint_dir(checkpoint)).model.tasks
    init_ray(address=address)
    configure_data_context(data_cpus=max(1.0, float(ray.cluster_resources().get("CPU", 1))))
    use_gpu = device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    ds = ray.data.read_binary_files(list(paths), include_paths=True)
    ds = ds.map_batches(
        RayPredictWorker,
        fn_constructor_kwargs={"checkpoint": checkpoint, "device": "cuda" if use_gpu else "cpu", "score_thr": score_thr},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, workers)),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    os.makedirs(out_dir, exist_ok=True)
    frames = []
    for row in ds.iter_rows():
        name = str(row["name"])
        files = {k: row[k] for k in ("overlay", "sem", "drv") if len(row[k])}
        write_files(out_dir, os.path.splitext(name)[0], files)
        frames.append(json.loads(row["det"]))
    if "det" in tasks:
        write_det_json(out_dir, frames)
    return frames


# --------------------------------------------------------------------------- command


def predict_command(args) -> int:
    out_dir = os.path.abspath(args.out)
    try:
        paths = resolve_inputs(args.inputs)
        if args.distributed:
            frames = predict_distributed(
                args.checkpoint,
                paths,
                out_dir,
                batch_size=args.batch_size,
                workers=args.workers,
                device=args.device,
                score_thr=args.score_thr,
            )
        else:
            predictor = load_predictor(args.checkpoint, device=args.device, score_thr=args.score_thr)
            frames = predict_files(predictor, paths, out_dir, batch_size=args.batch_size)
    except (PredictInputError, FileNotFoundError) as e:
        print(f"paf-ray predict: {e}", file=sys.stderr)
        return 2
    boxes = sum(len(f["labels"]) for f in frames)
    print(f"predicted {len(frames)} images ({boxes} boxes with score >= {args.score_thr}) -> {out_dir}")
    for kind in ("overlay", "sem", "drv"):
        folder = os.path.join(out_dir, kind)
        if os.path.isdir(folder):
            print(f"  {kind}: {folder}/<stem>.png")
    if os.path.exists(os.path.join(out_dir, "det.json")):
        print(f"  det: {os.path.join(out_dir, 'det.json')}")
    return 0
