"""Inference: a predictor for notebooks, and `paf-ray predict` writing overlays and official-format outputs.

``load_predictor(checkpoint).predict(image)`` returns, at the image's own resolution, one entry
per task of the model: ``{task: prediction}`` (det: ``{"boxes" (N, 4) x1y1x2y2, "scores" (N,),
"labels" (N,) indices of the class list}``; mask tasks: an (H, W) uint8 mask in the official
encoding). What each task's prediction and files are is the task's (``paf_ray/tasks``).

``paf-ray predict CKPT INPUTS... --out DIR`` writes, per image, ``DIR/overlay/<stem>.png`` and each
task's per-frame files (``DIR/<task>/<stem>.png`` for the mask tasks), plus the files that hold
every frame (``DIR/det.json``) -- what ``paf-ray score`` and the official toolkit read. An image
that cannot be read, or that has more pixels than the limit (``--max-image-pixels``, default the
checkpoint's ``data.max_image_pixels``; refused from its header, never decoded), is skipped and
counted (``--stop-on-bad-image`` stops instead); whatever happens, the files that hold every frame
are written for the frames that were predicted, and every file is written whole or not at all. With
``--distributed`` the same outputs come from Ray Data batch inference (an actor pool that holds
the model).
"""

from __future__ import annotations

import glob
import io
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from paf_ray.data.contracts import DatasetError
from paf_ray.data.decode import MAX_IMAGE_PIXELS, decode_image
from paf_ray.data.transforms import val_geometry
from paf_ray.runtime import files, storage
from paf_ray.tasks import ordered
from paf_ray.train.checkpoint import checkpoint_location, load_model, read_config, resolve_checkpoint_dir

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class PredictInputError(ValueError):
    """An input path or image cannot be used."""


# --------------------------------------------------------------------------- inputs


def resolve_inputs(inputs: Sequence[str]) -> list[str]:
    """Image files, folders (their images, not recursive) and glob patterns -> sorted unique paths.
    A file or folder may be a URI (s3://, gs://, file://); globs are local."""
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


def read_image(source: str | bytes, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file (path or URI, or its bytes) as RGB uint8 (H, W, 3); PredictInputError naming the
    file when it cannot be read or has more than `max_pixels` pixels (refused before decoding)."""
    where = name or (source if isinstance(source, str) else "<bytes>")
    try:
        return decode_image(where, source if isinstance(source, bytes) else None, max_pixels)
    except DatasetError as e:
        raise PredictInputError(str(e)) from None


def letterbox(image: np.ndarray, input_size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The val transform's letterbox (content top-left, zero pad) -> (canvas (H, W, 3) uint8, scale),
    scale = network-input pixels per original pixel."""
    geometry = val_geometry(image.shape[1], image.shape[0], input_size)
    return geometry.image(image), geometry.scale


# --------------------------------------------------------------------------- predictor


@dataclass
class Predictor:
    """A model loaded for inference; ``predict(image)`` gives results at the image's resolution."""

    model: torch.nn.Module
    cfg: Any
    meta: dict = field(default_factory=dict)
    device: torch.device = torch.device("cpu")
    score_thr: float = 0.0
    max_pixels: int = MAX_IMAGE_PIXELS  # images with more pixels are refused before decoding

    @property
    def tasks(self) -> list:
        return ordered(self.cfg.model.tasks)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.cfg.data.input_size)

    def predict(self, image: np.ndarray | str, score_thr: float | None = None) -> dict[str, Any]:
        """One RGB uint8 (H, W, 3) array or image path -> {task: prediction} at the image's size."""
        return self.predict_batch([image], score_thr)[0]

    @torch.no_grad()
    def predict_batch(self, images: Sequence[np.ndarray | str], score_thr: float | None = None) -> list[dict]:
        thr = self.score_thr if score_thr is None else score_thr
        arrays = [read_image(im, max_pixels=self.max_pixels) if isinstance(im, str) else np.asarray(im)
                  for im in images]
        for i, a in enumerate(arrays):
            if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
                raise PredictInputError(f"image {i}: expected RGB uint8 (H, W, 3), got {a.dtype} {a.shape}")
        boxed = [letterbox(a, self.input_size) for a in arrays]
        batch = torch.from_numpy(np.stack([b[0] for b in boxed])).permute(0, 3, 1, 2).contiguous().to(self.device)
        outputs = self.model(batch)
        return [{t.name: t.postprocess(outputs[t.name][i], scale, array.shape[:2], thr) for t in self.tasks}
                for i, (array, (_, scale)) in enumerate(zip(arrays, boxed))]


def load_predictor(checkpoint: str, device: str = "cpu", score_thr: float = 0.0,
                   max_pixels: int | None = None) -> Predictor:
    """Load a paf_ray checkpoint (dir, run dir or model.pt) as a :class:`Predictor` (adapters merged).
    `max_pixels`: the pixel limit of input images (default: the checkpoint's data.max_image_pixels)."""
    device = resolve_device(device)
    model, cfg, meta = load_model(checkpoint, device=device)
    model.eval()
    return Predictor(model=model, cfg=cfg, meta=meta, device=torch.device(device), score_thr=score_thr,
                     max_pixels=max_pixels or cfg.data.max_image_pixels)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# --------------------------------------------------------------------------- outputs


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def overlay(image: np.ndarray, predictions: dict[str, Any], tasks) -> np.ndarray:
    """Every task's prediction painted over the frame, in the tasks' draw order (masks, then boxes)."""
    out = np.asarray(image, np.uint8)
    for task in sorted(tasks, key=lambda t: t.draw_order):
        if task.name in predictions:
            out = task.draw(out, predictions[task.name])
    return out


def frame_outputs(name: str, image: np.ndarray, predictions: dict, tasks) -> tuple[dict[str, bytes], dict]:
    """One frame's output files ({path relative to the output folder: bytes}: the overlay and each task's
    per-frame files) and its records for the files that hold every frame ({task: record})."""
    stem = os.path.splitext(name)[0]
    out = {f"overlay/{stem}.png": _png(overlay(image, predictions, tasks))}
    records = {}
    for task in tasks:
        out.update(task.frame_files(stem, predictions[task.name]))
        record = task.frame_record(name, predictions[task.name])
        if record is not None:
            records[task.name] = record
    return out, records


def write_outputs(out_dir: str, outputs: dict[str, bytes]) -> None:
    for rel, data in outputs.items():
        files.write_bytes(os.path.join(out_dir, rel), data)


def write_final(out_dir: str, records: dict[str, list], tasks) -> list[str]:
    """The files that hold every frame (e.g. det.json), written whole; their paths."""
    written = []
    for task in tasks:
        for rel, data in task.final_files(records.get(task.name, [])).items():
            files.write_bytes(os.path.join(out_dir, rel), data)
            written.append(os.path.join(out_dir, rel))
    return written


@dataclass
class PredictReport:
    frames: int = 0
    skipped: list[str] = field(default_factory=list)  # "<path>: why"
    final_files: list[str] = field(default_factory=list)
    records: dict[str, list] = field(default_factory=dict)


def predict_files(predictor: Predictor, paths: Sequence[str], out_dir: str, batch_size: int = 4,
                  stop_on_bad_image: bool = False) -> PredictReport:
    """Predict `paths` (local paths or URIs) in this process and write all outputs."""
    report, tasks = PredictReport(), predictor.tasks
    try:
        for start in range(0, len(paths), max(1, batch_size)):
            chunk, images, stop = [], [], None
            for p in paths[start:start + max(1, batch_size)]:
                try:
                    images.append(read_image(storage.read_bytes(p), name=p, max_pixels=predictor.max_pixels))
                    chunk.append(p)
                except (PredictInputError, OSError) as e:
                    if stop_on_bad_image:  # the frames before it are still predicted
                        stop = PredictInputError(str(e))
                        break
                    report.skipped.append(str(e))
                    print(f"paf-ray predict: skipped {e}", file=sys.stderr)
            for path, image, pred in zip(chunk, images, predictor.predict_batch(images) if chunk else []):
                outputs, records = frame_outputs(os.path.basename(path), image, pred, tasks)
                write_outputs(out_dir, outputs)
                for t, r in records.items():
                    report.records.setdefault(t, []).append(r)
                report.frames += 1
            if stop is not None:
                raise stop
    finally:  # the files of every frame stand for the frames that were predicted, whatever stopped us
        report.final_files = write_final(out_dir, report.records, tasks)
    return report


# --------------------------------------------------------------------------- Ray Data batch inference


class RayPredictWorker:
    """Ray Data actor: holds the model; maps a batch of image files to their rendered outputs."""

    def __init__(self, checkpoint: str, device: str, score_thr: float, max_pixels: int | None = None):
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.predictor = load_predictor(checkpoint, device=device, score_thr=score_thr, max_pixels=max_pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"name": [], "outputs": [], "records": [], "error": []}
        good, images = [], []
        for data, path in zip(batch["bytes"], batch["path"]):
            try:
                images.append(read_image(bytes(data), name=str(path), max_pixels=self.predictor.max_pixels))
                good.append(str(path))
            except PredictInputError as e:
                out["name"].append(os.path.basename(str(path)))
                out["outputs"].append(b"")
                out["records"].append("{}")
                out["error"].append(str(e))
        preds = self.predictor.predict_batch(images) if images else []
        for path, image, pred in zip(good, images, preds):
            outputs, records = frame_outputs(os.path.basename(path), image, pred, self.predictor.tasks)
            buf = io.BytesIO()
            np.savez(buf, **{k.replace("/", "|"): np.frombuffer(v, np.uint8) for k, v in outputs.items()})
            out["name"].append(os.path.basename(path))
            out["outputs"].append(buf.getvalue())
            out["records"].append(json.dumps(records))
            out["error"].append("")
        return {k: np.array(v, dtype=object) for k, v in out.items()}


def predict_distributed(checkpoint: str, paths: Sequence[str], out_dir: str, batch_size: int = 4, workers: int = 1,
                        device: str = "auto", score_thr: float = 0.0, address: str | None = None,
                        stop_on_bad_image: bool = False, max_pixels: int | None = None) -> PredictReport:
    """Batch inference with Ray Data: read the files, an actor pool of `workers` models, write outputs here."""
    import ray

    from paf_ray.runtime.ray import configure_data_context, init_ray

    # absolute path or URI: the actors do not share our working directory (nor, on other nodes, our cache)
    checkpoint = checkpoint_location(checkpoint)
    tasks = ordered(read_config(resolve_checkpoint_dir(checkpoint)).model.tasks)
    init_ray(address=address)
    configure_data_context(max(1.0, float(ray.cluster_resources().get("CPU", 1))))
    use_gpu = device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    ds = ray.data.read_binary_files(list(paths), include_paths=True)
    ds = ds.map_batches(
        RayPredictWorker,
        fn_constructor_kwargs={"checkpoint": checkpoint, "device": "cuda" if use_gpu else "cpu", "score_thr": score_thr,
                               "max_pixels": max_pixels},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, workers)),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    report = PredictReport()
    try:
        for row in ds.iter_rows():
            if row["error"]:
                if stop_on_bad_image:
                    raise PredictInputError(str(row["error"]))
                report.skipped.append(str(row["error"]))
                print(f"paf-ray predict: skipped {row['error']}", file=sys.stderr)
                continue
            with np.load(io.BytesIO(row["outputs"])) as z:
                write_outputs(out_dir, {k.replace("|", "/"): z[k].tobytes() for k in z.files})
            for t, r in json.loads(row["records"]).items():
                report.records.setdefault(t, []).append(r)
            report.frames += 1
    finally:
        report.final_files = write_final(out_dir, report.records, tasks)
    return report
