"""Inference on the six real BDD100K frames with a tiny checkpoint: `paf-ray predict` outputs,
the Python API, Ray Data batch inference, overlays, and the exported TorchScript/ONNX model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from paf_ray.cli import main
from paf_ray.data.bdd100k import DET_CLASSES, DET_PALETTE, DRV_PALETTE, SEM_PALETTE

PAF_RAY = os.path.join(os.path.dirname(sys.executable), "paf-ray")
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
STEMS = sorted(
    ["0ace96c3-48481887", "3c0e7240-96e390d2", "7dd9ef45-f197db95", "8e1c1ab0-a8b92173", "9aa94005-ff1d4c9a",
     "adb4871d-4d063244"]
)


def _tiny_cfg(lv: bool = False):
    from paf_ray.config import from_dict

    model = {
        "backbone": {"name": "tiny", "tiny": {"width": 8}, "random_init": True},
        "fpn_channels": 16,
        "adapter": {"kind": "lora", "lora": {"rank": 2}},
        "heads": {"sem": {"channels": 16}, "drv": {"channels": 16},
                  "det": {"representation_size": 32, "rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 50}},
    }
    if lv:
        model["lv_adapter"] = {"enabled": True, "clip_model": "paf-tiny-clip", "random_init": True, "n_ctx": 2, "heads": 2}
    return from_dict({"data": {"input_size": [320, 192]}, "model": model})


def _make_checkpoint(directory, lv: bool = False, merge: bool = True) -> str:
    """A tiny 3-task model with non-zero LoRA deltas (merged as after an adapt stage when `merge`)."""
    from paf_ray.models.multitask import build_model
    from paf_ray.models.stages import finish_stage
    from paf_ray.train.checkpoint import save_checkpoint

    cfg = _tiny_cfg(lv)
    torch.manual_seed(0)
    model = build_model(cfg.model, input_size=cfg.data.input_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(std=0.1)
    if merge:
        assert finish_stage(model, "adapt")
    save_checkpoint(str(directory), model, cfg, {"stage": "adapt", "epoch": 1, "step": 1})
    return str(directory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _make_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def images_dir(testdata_dir):
    return os.path.join(testdata_dir, "bdd100k-images")


@pytest.fixture(scope="module")
def predicted(checkpoint, images_dir, tmp_path_factory):
    """`paf-ray predict` run once on the six frames (score threshold 0: keep every detection)."""
    out = tmp_path_factory.mktemp("pred")
    proc = subprocess.run(
        [PAF_RAY, "predict", checkpoint, images_dir, "--out", str(out), "--score-thr", "0.0", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return str(out)


def test_predict_cli_writes_overlays_masks_and_det_json_at_frame_size(predicted):
    for kind in ("overlay", "sem", "drv"):
        files = sorted(os.listdir(os.path.join(predicted, kind)))
        assert files == [f"{s}.png" for s in STEMS], kind
        for name in files:
            with Image.open(os.path.join(predicted, kind, name)) as img:
                assert img.size == (1280, 720)
                assert img.mode == ("RGB" if kind == "overlay" else "L")
                if kind != "overlay":
                    limit = len(SEM_PALETTE) if kind == "sem" else len(DRV_PALETTE)
                    assert np.asarray(img).max() < limit  # official ids only
    with open(os.path.join(predicted, "det.json"), encoding="utf-8") as f:
        frames = json.load(f)
    assert [fr["name"] for fr in frames] == [f"{s}.jpg" for s in STEMS]
    labels = [lab for fr in frames for lab in fr["labels"]]
    assert labels, "a random tiny Faster R-CNN still scores boxes above 0"
    for lab in labels:
        assert lab["category"] in DET_CLASSES and 0.0 <= lab["score"] <= 1.0
        b = lab["box2d"]
        assert 0 <= b["x1"] <= b["x2"] <= 1280 and 0 <= b["y1"] <= b["y2"] <= 720


def test_predicted_files_read_back_through_paf_ray_score(predicted, capsys):
    det = os.path.join(predicted, "det.json")
    proc = subprocess.run([PAF_RAY, "score", "det", det, det, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    # Predictions scored against themselves as ground truth: every box is found.
    assert result["AP"] == pytest.approx(100.0) and result["AR100"] == pytest.approx(100.0)
    for task in ("sem", "drv"):
        folder = os.path.join(predicted, task)
        assert main(["score", task, folder, folder, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["mIoU"] == pytest.approx(100.0)


def test_python_api_predicts_at_original_resolution(checkpoint, images_dir, predicted):
    import paf_ray

    predictor = paf_ray.load(checkpoint)
    path = os.path.join(images_dir, f"{STEMS[0]}.jpg")
    from_path = predictor.predict(path)
    assert set(from_path) == {"det", "sem", "drv"}
    assert from_path["sem"].shape == from_path["drv"].shape == (720, 1280)
    det = from_path["det"]
    assert det["boxes"].shape == (len(det["scores"]), 4) == (len(det["labels"]), 4)
    # The same masks as the command wrote.
    written = np.asarray(Image.open(os.path.join(predicted, "sem", f"{STEMS[0]}.png")))
    np.testing.assert_array_equal(from_path["sem"], written)
    # An array in, and a smaller frame: outputs follow the input's own size.
    small = np.asarray(Image.open(path).convert("RGB").resize((640, 360)))
    result = predictor.predict(small, score_thr=0.5)
    assert result["sem"].shape == (360, 640)
    assert (result["det"]["scores"] >= 0.5).all()
    assert (result["det"]["boxes"][:, 2] <= 640).all() and (result["det"]["boxes"][:, 3] <= 360).all()


def test_predict_skips_and_counts_a_bad_image_and_still_writes_every_output(checkpoint, images_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "frames"
    shutil.copytree(images_dir, folder)
    (folder / "0broken.jpg").write_bytes(b"not a jpeg")  # second in the sorted order
    out = tmp_path / "o"
    assert main(["predict", checkpoint, str(folder), "--out", str(out), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "0broken.jpg" in captured.err
    assert "predicted 6 images, 1 skipped" in captured.out
    assert sorted(os.listdir(out / "sem")) == [f"{s}.png" for s in STEMS]
    with open(out / "det.json", encoding="utf-8") as f:
        assert [fr["name"] for fr in json.load(f)] == [f"{s}.jpg" for s in STEMS]
    # asked to stop: it stops at the bad frame, one line naming it, and det.json holds what was done (the
    # frame sorted before it, predicted although it was read in the same batch)
    stop = tmp_path / "stop"
    assert main(["predict", checkpoint, str(folder), "--out", str(stop), "--device", "cpu", "--stop-on-bad-image"]) == 2
    assert "0broken.jpg" in capsys.readouterr().err
    with open(stop / "det.json", encoding="utf-8") as f:
        assert [fr["name"] for fr in json.load(f)] == [f"{STEMS[0]}.jpg"]
    assert os.listdir(stop / "sem") == [f"{STEMS[0]}.png"]
    assert main(["predict", checkpoint, str(tmp_path / "nope*.jpg"), "--out", str(tmp_path / "o")]) == 2
    assert "nope*.jpg" in capsys.readouterr().err


def test_predict_skips_images_over_the_pixel_limit_without_decoding_them(checkpoint, images_dir, tmp_path, capsys):
    from test_bad_input import huge_jpeg, huge_png

    folder = tmp_path / "frames"
    folder.mkdir()
    frame = f"{STEMS[0]}.jpg"
    (folder / frame).write_bytes(open(os.path.join(images_dir, frame), "rb").read())
    (folder / "bomb.jpg").write_bytes(huge_jpeg(60000, 60000))
    (folder / "bomb_png.png").write_bytes(huge_png(50000, 50000))
    out = tmp_path / "o"
    assert main(["predict", checkpoint, str(folder), "--out", str(out), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "predicted 1 images, 2 skipped (unreadable or too large)" in captured.out
    for name, claim in (("bomb.jpg", "60000x60000 = 3600000000"), ("bomb_png.png", "50000x50000 = 2500000000")):
        assert (f"paf-ray predict: skipped {folder / name}: image of {claim} pixels is over the limit of 16777216 "
                "(data.max_image_pixels, --max-image-pixels); refused before decoding") in captured.err.splitlines()
    with open(out / "det.json", encoding="utf-8") as f:
        assert [fr["name"] for fr in json.load(f)] == [frame]
    # --max-image-pixels: a 1280x720 frame (921600 pixels) is over 900000
    low = tmp_path / "low"
    assert main(["predict", checkpoint, str(folder), "--out", str(low), "--device", "cpu",
                 "--max-image-pixels", "900000"]) == 1
    assert "predicted 0 images, 3 skipped" in capsys.readouterr().out
    with open(low / "det.json", encoding="utf-8") as f:
        assert json.load(f) == []


def test_a_predict_that_fails_while_writing_leaves_whole_files_and_no_temporary_one(checkpoint, images_dir, tmp_path):
    """A file-size limit of 200 kB (RLIMIT_FSIZE: writes past it fail, as on a full disk) stops `paf-ray
    predict` in the middle of writing the first overlay (~1.5 MB): no part of it is left, under its
    name or a temporary one; det.json (small) is written; one line names the file."""
    import resource
    import signal

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "o"
    proc = subprocess.run([PAF_RAY, "predict", checkpoint, os.path.join(images_dir, f"{STEMS[0]}.jpg"), "--out",
                           str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size)
    assert proc.returncode == 1
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"paf-ray predict: [Errno 27] File too large: "
                                               f"'{out}/overlay/{STEMS[0]}.png'"), proc.stderr
    written = sorted(os.path.relpath(os.path.join(d, n), out) for d, _, names in os.walk(out) for n in names)
    assert written == ["det.json"]
    with open(out / "det.json", encoding="utf-8") as f:
        assert json.load(f) == []


def test_a_corrupt_or_mismatched_checkpoint_is_one_line_naming_its_file_and_keys(checkpoint, images_dir, tmp_path,
                                                                                capsys):
    import shutil

    def broken(name: str, change) -> str:
        d = tmp_path / name
        shutil.copytree(checkpoint, d)
        change(d)
        return str(d)

    def edit_config(old: str, new: str):
        def change(d):
            text = (d / "config.yaml").read_text()
            assert old in text
            (d / "config.yaml").write_text(text.replace(old, new))
        return change

    cut = broken("cut", lambda d: (d / "model.pt").write_bytes((d / "model.pt").read_bytes()[:1000]))
    wider = broken("wider", edit_config("fpn_channels: 16", "fpn_channels: 24"))
    more = broken("more", edit_config("  - drv\n", "  - drv\n  - lane\n"))
    image = os.path.join(images_dir, f"{STEMS[0]}.jpg")
    for ckpt, expected in ((cut, f"{cut}/model.pt: corrupt or cut short, not a torch file (RuntimeError: "),
                           (wider, f"{wider}/model.pt: does not match the model built from its config: "),
                           (more, f"{more}/model.pt: does not match the model built from its config: ")):
        assert main(["predict", ckpt, image, "--out", str(tmp_path / "o"), "--device", "cpu"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"paf-ray predict: {expected}") and "\n" not in err, err
    assert main(["predict", wider, image, "--out", str(tmp_path / "o")]) == 1
    assert "tensor(s) of another shape (first: size mismatch for " in capsys.readouterr().err
    assert main(["predict", more, image, "--out", str(tmp_path / "o")]) == 1
    assert "missing (first ['heads.lane." in capsys.readouterr().err


class _RunsCode:
    """A pickle that would create a file when unpickled (what a hostile model.pt could carry)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_predict_refuses_a_checkpoint_carrying_code_in_one_line(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad_ckpt"
    shutil.copytree(checkpoint, bad)
    marker = tmp_path / "code_ran"
    torch.save({"weight": torch.zeros(1), "payload": _RunsCode(str(marker))}, bad / "model.pt")
    proc = subprocess.run([PAF_RAY, "predict", str(bad), os.path.join(REPO, "tests", "data", "bdd100k-images"),
                           "--out", str(tmp_path / "o"), "--device", "cpu"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert not marker.exists(), "loading the checkpoint ran code from it"
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "model.pt" in err[0] and "refused" in err[0], proc.stderr
    debug = subprocess.run([PAF_RAY, "--debug", "predict", str(bad), os.path.join(REPO, "tests", "data", "bdd100k-images"),
                            "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and not marker.exists()


def test_distributed_predict_on_ray_data_matches_local(ray_local, checkpoint, images_dir, predicted, tmp_path):
    from paf_ray.predict import predict_distributed, resolve_inputs

    paths = resolve_inputs([os.path.join(images_dir, "*.jpg")])
    out = str(tmp_path / "dist")
    report = predict_distributed(checkpoint, paths, out, batch_size=3, workers=1, device="cpu", score_thr=0.0)
    assert report.frames == 6 and not report.skipped
    for kind in ("sem", "drv"):
        for stem in STEMS:
            a = np.asarray(Image.open(os.path.join(out, kind, f"{stem}.png")))
            b = np.asarray(Image.open(os.path.join(predicted, kind, f"{stem}.png")))
            # Other batch sizes change float rounding, which may flip a near-tie pixel.
            assert a.shape == b.shape and (a == b).mean() > 0.999
    assert sorted(os.listdir(os.path.join(out, "overlay"))) == [f"{s}.png" for s in STEMS]
    with open(os.path.join(out, "det.json")) as f, open(os.path.join(predicted, "det.json")) as g:
        dist, local = json.load(f), json.load(g)
    assert [fr["name"] for fr in dist] == [fr["name"] for fr in local]
    assert sum(len(fr["labels"]) for fr in dist) == pytest.approx(sum(len(fr["labels"]) for fr in local), rel=0.05)


def test_overlay_colours_classes_drivable_and_boxes():
    from paf_ray.predict import overlay
    from paf_ray.tasks import ordered

    image = np.full((40, 60, 3), 100, np.uint8)
    sem = np.zeros((40, 60), np.uint8)  # road
    sem[:, 30:] = 255  # unlabelled: left as is
    drv = np.full((40, 60), 2, np.uint8)  # background: no tint
    drv[30:, :10] = 1  # alternative lane
    det = {"boxes": np.array([[35.0, 5.0, 55.0, 25.0]]), "labels": np.array([2]), "scores": np.array([0.9])}
    out = overlay(image, {"sem": sem, "drv": drv, "det": det}, ordered(["det", "sem", "drv"]))
    road = np.array(SEM_PALETTE[0])
    assert np.abs(out[20, 15].astype(int) - (0.55 * 100 + 0.45 * road)).max() <= 1
    assert (out[35, 45] == 100).all()  # no sem, no drv, outside the box
    alt = out[35, 5].astype(int)
    assert np.abs(alt - (0.5 * (0.55 * 100 + 0.45 * road) + 0.5 * np.array(DRV_PALETTE[1]))).max() <= 1
    assert tuple(out[20, 55 - 1]) == DET_PALETTE[2] or tuple(out[20, 55]) == DET_PALETTE[2]  # car box edge


def _run_export(checkpoint, out, fmt, sample, capsys):
    assert main(["export", checkpoint, "--format", fmt, "--out", out, "--sample", sample, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_export_torchscript_loads_and_matches_on_another_frame(checkpoint, images_dir, tmp_path, capsys):
    from paf_ray.export import TOLERANCE, DeployableModel, compare_outputs, sample_frame
    from paf_ray.tasks import ordered
    from paf_ray.train.checkpoint import load_model

    out = str(tmp_path / "m.pt")
    report = _run_export(checkpoint, out, "torchscript", os.path.join(images_dir, f"{STEMS[0]}.jpg"), capsys)
    assert report["adapters_merged"] and report["detections_on_sample"] > 0
    assert all(report["max_abs_diff"][k] <= TOLERANCE[k] for k in TOLERANCE)

    import torchvision  # noqa: F401  (registers the nms / roi_align ops the file calls)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.jit.load(out)
    assert not [n for n, _ in exported.named_parameters() if "lora_" in n]  # deltas merged into the convs
    frame = sample_frame(os.path.join(images_dir, f"{STEMS[3]}.jpg"), (1280, 720))  # not the traced sample
    model, cfg, _ = load_model(checkpoint)
    tasks = ordered(cfg.model.tasks)
    reference = DeployableModel(model, tasks, cfg.data.input_size, (1280, 720)).eval()
    with torch.no_grad():
        got, want = exported(frame), reference(frame)
    assert got[3].shape == (1, 19, 720, 1280) and got[4].shape == (1, 3, 720, 1280)
    assert report["outputs"] == ["boxes", "scores", "labels", "sem_logits", "drv_logits"]
    kinds = {n: k for t in tasks for n, k in t.export_kinds.items()}
    diffs = compare_outputs([w.numpy() for w in want], [g.numpy() for g in got], report["outputs"], kinds)
    assert all(diffs[k] <= TOLERANCE[k] for k in TOLERANCE)


def _readme_snippet() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    after = text.split("<!-- exported-model-snippet", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_snippet_runs_an_exported_model_in_a_plain_process(checkpoint, images_dir, tmp_path, capsys):
    """The README's lines for using an exported file run as written in a process without paf_ray,
    and the `import torchvision` they insist on is really what makes the file load."""
    model_file = tmp_path / "model.ts"
    _run_export(checkpoint, str(model_file), "torchscript", os.path.join(images_dir, f"{STEMS[0]}.jpg"), capsys)
    snippet = _readme_snippet().replace('"model.ts"', repr(str(model_file)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ran = subprocess.run([sys.executable, "-I", "-c", snippet], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "boxes" in ran.stdout and "(720, 1280)" in ran.stdout
    without = snippet.replace("import torchvision", "pass  # import torchvision")
    failed = subprocess.run([sys.executable, "-I", "-c", without], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert failed.returncode != 0 and "torchvision" in failed.stderr


def test_export_with_lv_adapter_bakes_class_embeddings(tmp_path, images_dir, capsys):
    import onnxruntime as ort

    checkpoint = _make_checkpoint(tmp_path / "lv", lv=True, merge=False)
    sample = os.path.join(images_dir, f"{STEMS[1]}.jpg")
    report = _run_export(checkpoint, str(tmp_path / "lv.pt"), "torchscript", sample, capsys)
    assert report["class_embeddings_baked"] and report["adapters_merged_at_export"]
    import torchvision  # noqa: F401

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.jit.load(str(tmp_path / "lv.pt"))
    names = [n for n, _ in exported.named_parameters()] + [n for n, _ in exported.named_buffers()]
    assert not [n for n in names if "text_encoder" in n]  # the text tower is gone, its output kept
    assert [n for n in names if "baked_class_embeddings" in n]

    onnx_report = _run_export(checkpoint, str(tmp_path / "lv.onnx"), "onnx", sample, capsys)
    assert all(onnx_report["max_abs_diff"][k] <= onnx_report["tolerance"][k] for k in onnx_report["tolerance"])
    session = ort.InferenceSession(str(tmp_path / "lv.onnx"), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"frame": np.zeros((1, 3, 720, 1280), np.uint8)})
    assert [o.shape[-2:] for o in outputs[3:]] == [(720, 1280), (720, 1280)]
