"""Bad input of our own, each ending in one line naming its file or key and costing neither memory
nor a half-written output: images whose header claims a huge size, impossible synthetic datasets,
empty or wrongly nested dataset roots, missing inputs of a run, and corrupt or over-deep files.
None of these tests starts Ray."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from paf_ray import cli
from paf_ray.data.contracts import DatasetError
from paf_ray.data.decode import MAX_IMAGE_PIXELS, decode_image, read_mask

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEEP = "[" * 100_000 + "]" * 100_000  # json.loads and PyYAML recurse: RecursionError, not a value


# --------------------------------------------------------------------------- small files claiming huge sizes


def huge_jpeg(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose frame header (SOF0) claims width x height: a few hundred bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 40)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def huge_png(width: int, height: int) -> bytes:
    """An 8-bit grey PNG whose IHDR claims width x height (valid CRCs), with 64 bytes of pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_crafted_headers_are_small_files_that_pil_reads_as_huge():
    for data, size in ((huge_jpeg(60000, 60000), (60000, 60000)), (huge_png(50000, 50000), (50000, 50000))):
        assert len(data) < 1000
        Image.MAX_IMAGE_PIXELS, saved = None, Image.MAX_IMAGE_PIXELS
        try:
            with Image.open(io.BytesIO(data)) as im:
                assert im.size == size
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def test_an_image_over_the_pixel_limit_is_refused_from_its_header_naming_the_file(tmp_path):
    bomb, over = tmp_path / "bomb.jpg", tmp_path / "over.jpg"
    bomb.write_bytes(huge_jpeg(60000, 60000))  # over PIL's own limit too: ours must be the one that fires
    over.write_bytes(huge_jpeg(5000, 4000))  # 20 MP: over ours, under PIL's
    for path, w, h in ((bomb, 60000, 60000), (over, 5000, 4000)):
        with pytest.raises(DatasetError) as e:
            decode_image(str(path))
        assert str(e.value) == (f"{path}: image of {w}x{h} = {w * h} pixels is over the limit of {MAX_IMAGE_PIXELS} "
                                "(data.max_image_pixels, --max-image-pixels); refused before decoding")
    # the limit is a setting: raised above 20 MP, the same file is decoded (libjpeg pads the missing rows)
    assert decode_image(str(over), max_pixels=25_000_000).shape == (4000, 5000, 3)
    png = tmp_path / "mask.png"
    png.write_bytes(huge_png(50000, 50000))
    with pytest.raises(DatasetError, match=r"mask\.png: sem mask of 50000x50000 = 2500000000 pixels is over"):
        read_mask(str(png), "sem mask")
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's own setting is left as it was


def test_refusing_a_huge_header_costs_no_memory(tmp_path):
    """In a fresh process: the peak RSS grows by less than 50 MB over refusing both files (decoding the
    JPEG's claim would take 10.8 GB)."""
    (tmp_path / "bomb.jpg").write_bytes(huge_jpeg(60000, 60000))
    (tmp_path / "bomb.png").write_bytes(huge_png(50000, 50000))
    script = f"""
import resource
from paf_ray.data.contracts import DatasetError
from paf_ray.data.decode import decode_image, read_mask
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
jpeg, png = {str(tmp_path / "bomb.jpg")!r}, {str(tmp_path / "bomb.png")!r}
for call in (lambda: decode_image(jpeg), lambda: read_mask(png, "mask")):
    try:
        call()
        raise SystemExit("decoded")
    except DatasetError as e:
        assert "refused before decoding" in str(e), e
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) < 50, f"peak RSS grew by {proc.stdout.strip()} MB"


def test_score_refuses_an_oversized_mask_naming_it(tmp_path, capsys):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    Image.fromarray(np.zeros((36, 64), np.uint8), mode="L").save(gt / "a.png")
    (pred / "a.png").write_bytes(huge_png(50000, 50000))
    for task in ("sem", "drv", "lane"):
        assert cli.main(["score", task, str(gt), str(pred)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"paf-ray score {task}: {pred / 'a.png'}: mask of 50000x50000") and "\n" not in err
    # the limit is an option of the mask scorers: below the ground truth's 2304 pixels, it is refused too
    assert cli.main(["score", "sem", str(gt), str(gt), "--max-image-pixels", "2000"]) == 2
    assert f"{gt / 'a.png'}: mask of 64x36 = 2304 pixels is over the limit of 2000" in capsys.readouterr().err
    assert cli.main(["score", "sem", str(gt), str(gt), "--json"]) == 0


def test_the_decode_of_a_run_refuses_an_oversized_frame_as_a_bad_sample(synth_root, tmp_path):
    """What each Ray Data decode task runs (pipeline.load_row), called here without Ray: the frame is
    refused from its header under data.max_image_pixels; with on_bad_sample: skip it is a counted skip."""
    from dataclasses import replace

    from paf_ray.config import DataConfig
    from paf_ray.data.index import build_index
    from paf_ray.data.pipeline import RowSettings, load_row
    from paf_ray.tasks import DEFAULT_TASKS, TASKS

    root = _root_copy(synth_root, tmp_path / "D")
    tasks = TASKS.get_many(DEFAULT_TASKS)
    record = build_index(root, tasks)["val"][0]
    data_cfg = DataConfig(root=root)
    assert RowSettings.of(data_cfg).max_image_pixels == MAX_IMAGE_PIXELS
    assert load_row(record, RowSettings.of(data_cfg), tasks, train=False)["error"] == ""
    with open(record["image"], "wb") as f:
        f.write(huge_jpeg(60000, 60000))
    with pytest.raises(DatasetError, match="image of 60000x60000 = 3600000000 pixels is over the limit"):
        load_row(record, RowSettings.of(data_cfg), tasks, train=True)
    low = RowSettings.of(replace(data_cfg, max_image_pixels=50_000))  # the limit is the config's
    with pytest.raises(DatasetError, match="image of 320x180 = 57600 pixels is over the limit of 50000"):
        load_row(build_index(root, tasks)["val"][1], low, tasks, train=False)
    row = load_row(record, RowSettings.of(replace(data_cfg, on_bad_sample="skip")), tasks, train=False)
    assert row["error"].startswith(f"{record['image']}: image of 60000x60000") and row["image"].shape == (1, 1, 3)


# --------------------------------------------------------------------------- data check


def _root_copy(synth_root: str, dest) -> str:
    shutil.copytree(synth_root, dest, ignore=shutil.ignore_patterns(".paf_ray_index"))
    return str(dest)


def test_data_check_reports_oversized_images_and_masks_as_errors(synth_root, tmp_path, capsys):
    root = _root_copy(synth_root, tmp_path / "D")
    folder = os.path.join(root, "images/100k/train")
    image = os.path.join(folder, sorted(os.listdir(folder))[0])
    with open(image, "wb") as f:
        f.write(huge_jpeg(60000, 60000))
    masks = os.path.join(root, "labels/sem_seg/masks/val")
    mask = os.path.join(masks, sorted(os.listdir(masks))[0])
    with open(mask, "wb") as f:
        f.write(huge_png(50000, 50000))
    assert cli.main(["data", "check", root]) == 1
    out = capsys.readouterr().out
    assert f"ERROR   {image}: image of 60000x60000 = 3600000000 pixels is over the limit" in out
    assert f"ERROR   {mask}: sem mask of 50000x50000 = 2500000000 pixels is over the limit" in out
    # --max-image-pixels: the synthetic frames (320x180) are over a limit of 50000 pixels
    assert cli.main(["data", "check", root, "--max-image-pixels", "50000", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert sum("57600 pixels is over the limit of 50000" in p["problem"] for p in report["problems"]) > 10


def test_data_check_fails_on_a_root_without_images_and_says_what_layout_it_expected(synth_root, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["data", "check", str(empty)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert f"WARNING {empty / 'images'}: split 'train' has no images" in lines
    assert f"WARNING {empty / 'images'}: split 'val' has no images" in lines
    expected = "expected the official layout ROOT/images/{100k,10k}/{train,val}/*.jpg (ROOT holds images/ and labels/)"
    assert f"ERROR   {empty}: no images in any split (train, val): {expected}" in lines

    root = _root_copy(synth_root, tmp_path / "parent" / "bdd100k")
    for wrong, hint in ((os.path.join(root, "images"), "looks like the images/ folder (it holds 100k/, 10k/): "
                                                       "point at its parent"),
                        (os.path.join(root, "images", "100k"), "looks like one image set's folder (it holds train/, "
                                                               "val/): point at the folder 2 levels up"),
                        (str(tmp_path / "parent"), f"the dataset seems to be in {root}")):
        assert cli.main(["data", "check", wrong]) == 1
        errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ERROR")]
        assert errors == [f"ERROR   {wrong}: no images in any split (train, val): {expected}; "
                          + (hint if hint.startswith("the") else f"{wrong} {hint}")]

    # one empty split: a warning, and the check still passes
    shutil.rmtree(os.path.join(root, "images/100k/val"))
    shutil.rmtree(os.path.join(root, "images/10k/val"))
    assert cli.main(["data", "check", root, "--split", "val"]) == 1  # only the empty split: no images at all
    assert cli.main(["data", "check", root, "--split", "train"]) == 0
    capsys.readouterr()


def test_a_deep_det_label_file_is_one_error_naming_it(synth_root, tmp_path, capsys):
    root = _root_copy(synth_root, tmp_path / "D")
    labels = os.path.join(root, "labels/det_20/det_train.json")
    with open(labels, "w") as f:
        f.write(DEEP)
    assert cli.main(["data", "check", root]) == 1
    out = capsys.readouterr().out
    assert f"ERROR   {labels}: malformed JSON: RecursionError" in out
    assert cli.main(["data", "index", root]) == 1
    assert capsys.readouterr().err.startswith(f"paf-ray data index: {labels}: malformed JSON: RecursionError")


def test_a_cut_or_deep_index_cache_is_rebuilt_with_a_line_saying_so(synth_root, tmp_path, capsys, caplog):
    from paf_ray.data.index import INDEX_DIR

    root = _root_copy(synth_root, tmp_path / "D")
    assert cli.main(["data", "index", root]) == 0
    capsys.readouterr()
    (kept,) = os.listdir(os.path.join(root, INDEX_DIR))
    path = os.path.join(root, INDEX_DIR, kept)
    with open(path, "rb") as f:
        whole = f.read()
    for bad, why in ((whole[:200], "JSONDecodeError"), (DEEP.encode(), "RecursionError")):
        with open(path, "wb") as f:
            f.write(bad)
        caplog.clear()
        assert cli.main(["data", "index", root]) == 0
        assert f"index {path} is unreadable ({why}" in caplog.text and "building it again" in caplog.text
        assert "index built" in capsys.readouterr().out
        with open(path, "rb") as f:
            assert f.read() == whole


# --------------------------------------------------------------------------- data synth


def test_synth_refuses_impossible_settings_before_creating_anything(tmp_path, capsys):
    out = tmp_path / "a" / "b"
    for args, message in ((["--size", "100000x100000"], "size 100000x100000 = 10000000000 pixels is over the "
                                                         f"image limit of {MAX_IMAGE_PIXELS} (data.max_image_pixels)"),
                          (["--images", "1000000000"], "images must be 1..100000, got 1000000000"),
                          (["--images", "0"], "images must be 1..100000, got 0"),
                          (["--size", "32x32"], "size must be at least 64x36, got 32x32"),
                          (["--val-fraction", "1.5"], "val_fraction must be in [0, 1), got 1.5")):
        t0 = time.perf_counter()
        assert cli.main(["data", "synth", "--out", str(out), *args]) == 2
        assert capsys.readouterr().err.strip() == f"paf-ray data synth: {message}"
        assert time.perf_counter() - t0 < 1.0  # nothing rendered, nothing allocated
        assert os.listdir(tmp_path) == []
    # the same bounds hold for a run's synthetic default, when its config is loaded
    from paf_ray.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"data\.synth: size 100000x100000 = 10000000000 pixels is over"):
        from_dict({"data": {"synth": {"size": [100000, 100000]}}})
    with pytest.raises(ConfigError, match=r"data\.max_image_pixels: must be > 0, got 0"):
        from_dict({"data": {"max_image_pixels": 0}})


def test_a_synth_that_fails_midway_leaves_nothing_behind(tmp_path):
    """Interrupted (Ctrl-C) while writing frames: no dataset folder, no temporary folder. Killed outright
    (SIGKILL, no clean-up possible): no dataset folder, and the next synth removes the dead one's
    temporary folder."""
    out = tmp_path / "sub" / "synth"
    # 20000 frames: minutes of work, so the signal always lands mid-write however loaded the box
    cmd = [sys.executable, "-m", "paf_ray", "data", "synth", "--out", str(out), "--images", "20000",
           "--size", "320x180"]
    env = {**os.environ, "PYTHONPATH": REPO}
    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        tmp = tmp_path / "sub" / f".synth.tmp-{proc.pid}"
        deadline = time.monotonic() + 60
        while not (tmp / "images/100k/train").is_dir() or len(os.listdir(tmp / "images/100k/train")) < 5:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err.decode()[-2000:]
        assert not out.exists()
        if sig == signal.SIGINT:
            assert os.listdir(tmp_path) == []  # the parent folder it created is gone too
        else:
            assert os.listdir(tmp_path / "sub") == [tmp.name]
    assert cli.main(["data", "synth", "--out", str(out), "--images", "4", "--size", "64x36"]) == 0
    assert sorted(os.listdir(tmp_path / "sub")) == ["synth"]


# --------------------------------------------------------------------------- inputs of a run, before Ray


def test_run_eval_and_tune_check_data_root_and_init_checkpoint_before_ray_starts(tmp_path):
    """Each command in one fresh process (one import of torch for all): exit 2 with one line naming the
    key, and Ray never started."""
    from test_predict import _make_checkpoint

    ckpt = _make_checkpoint(tmp_path / "ckpt")
    missing, afile, not_ckpt = tmp_path / "nowhere", tmp_path / "file.txt", tmp_path / "empty_folder"
    afile.write_text("x")
    not_ckpt.mkdir()
    runs, sweep = ["--out", str(tmp_path / "runs")], ["--out", str(tmp_path / "sweep")]
    cases = [
        (["run", "jobs/smoke.yaml", *runs, "--set", f"data.root={missing}"],
         f"paf-ray run: config error: data.root: {missing}: no such folder"),
        (["run", "jobs/smoke.yaml", *runs, "--set", f"data.root={afile}"],
         f"paf-ray run: config error: data.root: {afile}: no such folder"),
        (["run", "jobs/smoke.yaml", *runs, "--set", f"train.init_checkpoint={not_ckpt}"],
         f"paf-ray run: config error: train.init_checkpoint: {not_ckpt}: not a paf_ray checkpoint"),
        (["tune", "jobs/tune_smoke.yaml", *sweep, "--set", f"data.root={missing}"],
         f"paf-ray tune: config error: data.root: {missing}: no such folder"),
        (["tune", "jobs/tune_smoke.yaml", *sweep, "--set", f"train.init_checkpoint={missing}"],
         f"paf-ray tune: config error: train.init_checkpoint: {missing}: not a paf_ray checkpoint"),
        (["eval", ckpt, "--set", f"data.root={missing}"],
         f"paf-ray eval: config error: data.root: {missing}: no such folder"),
    ]
    script = """
import contextlib, io, json, sys, time
from paf_ray.cli import main
results = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(args)
    ray = sys.modules.get("ray")
    results.append([rc, err.getvalue().strip(), time.perf_counter() - t0, bool(ray and ray.is_initialized())])
print(json.dumps(results))
"""
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([args for args, _ in cases])], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    for (args, start), (rc, err, seconds, ray_started) in zip(cases, json.loads(proc.stdout.splitlines()[-1])):
        assert rc == 2 and err.startswith(start) and "\n" not in err, (args, err)
        assert not ray_started, args
        assert seconds < 60, (args, seconds)  # the first one imports torch; none starts Ray
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sweep").exists()


# --------------------------------------------------------------------------- checkpoints and run files


def _checkpoint_files(directory, config: str = "name: x\n", meta: str = "{}") -> str:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.yaml"), "w") as f:
        f.write(config)
    with open(os.path.join(directory, "meta.json"), "w") as f:
        f.write(meta)
    return str(directory)


def test_corrupt_or_deep_meta_json_is_one_error_naming_it(tmp_path):
    from paf_ray.train.checkpoint import CheckpointError, read_meta

    for name, meta, why in (("cut", '{"stage": "ad', "JSONDecodeError"), ("deep", DEEP, "RecursionError"),
                            ("list", "[1, 2]", "expected a JSON object, got list")):
        d = _checkpoint_files(tmp_path / name, meta=meta)
        with pytest.raises(CheckpointError) as e:
            read_meta(d)
        text = str(e.value)
        assert text.startswith(f"{d}/meta.json: corrupt (") and why in text and "\n" not in text


def test_a_yaml_tag_or_deep_nesting_in_a_checkpoint_config_is_one_error_naming_it(tmp_path):
    from paf_ray.config import ConfigError
    from paf_ray.train.checkpoint import read_config

    marker = tmp_path / "ran"
    tagged = _checkpoint_files(tmp_path / "tag",
                               config=f"name: x\nx: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError) as e:
        read_config(tagged)
    assert str(e.value).startswith(f"{tagged}/config.yaml:2:4: not valid YAML: could not determine a constructor "
                                   "for the tag 'tag:yaml.org,2002:python/object/apply:os.system'")
    assert not marker.exists()
    deep = _checkpoint_files(tmp_path / "deep", config="model: " + DEEP + "\n")
    with pytest.raises(ConfigError, match="config.yaml: not a config: its values are nested too deeply"):
        read_config(deep)


def test_a_run_folder_with_a_corrupt_summary_is_one_error_naming_it(tmp_path):
    from paf_ray.train.checkpoint import checkpoint_location

    run = tmp_path / "run"
    run.mkdir()
    for text, why in (('{"checkpoint": "/x', "JSONDecodeError"), (DEEP, "RecursionError")):
        (run / "summary.json").write_text(text)
        with pytest.raises(ValueError) as e:
            checkpoint_location(str(run))
        assert str(e.value).startswith(f"{run}/summary.json: not valid JSON ({why}")


def test_metrics_rows_survive_a_row_cut_by_a_crash_and_name_a_corrupt_one(tmp_path):
    from paf_ray.runtime.runs import read_metrics_rows

    rows = [{"stage": "s", "step": i} for i in range(3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "s", "st')
    assert read_metrics_rows(str(tmp_path)) == rows
    path.write_text(json.dumps(rows[0]) + "\n" + DEEP + "\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2: not a JSON row \(RecursionError"):
        read_metrics_rows(str(tmp_path))
