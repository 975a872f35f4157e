"""Lane markings of the synthetic BDD100K generator: files, bytes, and agreement with the scene."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from paf_ray.data import bdd100k as B
from paf_ray.data.bdd100k.synth import _NoiseBank, frame_rngs, render_frame, write_synthetic
from paf_ray.tasks.lane_metrics import decode_lane

SIZE = (320, 180)
SEM = {name: i for i, name in enumerate(B.SEM_CLASSES)}


@pytest.fixture(scope="module")
def frames():
    noise = _NoiseBank(0, *SIZE)
    frames = []
    for i in range(40):
        scene_rng, lane_rng = frame_rngs(0, i)
        frames.append(render_frame(scene_rng, SIZE[0], SIZE[1], noise, lane_rng))
    return frames


def _stems(folder: str) -> set[str]:
    return {os.path.splitext(n)[0] for n in os.listdir(folder)}


def test_lane_masks_are_written_for_the_100k_frames(tmp_path):
    root = write_synthetic(str(tmp_path / "s"), images=20, seed=0, size=SIZE)
    for split in B.SPLITS:
        lane_dir = os.path.join(root, B.LANE_MASKS_DIR.format(split=split))
        drv_dir = os.path.join(root, B.DRV_MASKS_DIR.format(split=split))
        assert _stems(lane_dir) == _stems(drv_dir) == _stems(os.path.join(root, B.IMAGES_DIR.format(image_set="100k", split=split)))
        for name in os.listdir(lane_dir):
            with Image.open(os.path.join(lane_dir, name)) as img:
                assert img.mode == "L" and img.size == SIZE
                mask = np.asarray(img)
            values = np.unique(mask)
            lane = values[values != B.LANE_BACKGROUND]
            assert (lane & 0b11001000 == 0).all(), (name, values)  # foreground: bits 3, 6, 7 clear
            assert lane.size > 0, name  # every frame has at least its road edges


def test_lane_pixels_lie_on_visible_road_or_kerb(frames):
    surface = (SEM["road"], SEM["sidewalk"])
    for i, f in enumerate(frames):
        fg = decode_lane(f.lane)[0]
        assert np.isin(f.sem[fg], surface).all(), f"frame {i}: lane pixels off the road surface"
        for vehicle in ("car", "truck", "bus", "person", "rider", "bicycle", "motorcycle"):
            assert not (fg & (f.sem == SEM[vehicle])).any(), (i, vehicle)


def test_lane_labels_cover_the_kinds_of_markings(frames):
    kinds = set()
    for f in frames:
        fg, cat, direction, style = decode_lane(f.lane)
        kinds |= {(B.LANE_CATEGORIES[c], B.LANE_DIRECTIONS[d], B.LANE_STYLES[s])
                  for c, d, s in zip(cat[fg], direction[fg], style[fg])}
    categories = {k[0] for k in kinds}
    assert {"single white", "double yellow", "single yellow", "road curb", "crosswalk"} <= categories
    assert {"solid", "dashed"} <= {k[2] for k in kinds}
    assert ("crosswalk", "vertical", "solid") in kinds and ("single white", "vertical", "solid") in kinds  # stop line
    assert ("single white", "parallel", "dashed") in kinds and ("double yellow", "parallel", "solid") in kinds


def test_lane_labels_sit_on_the_paint(frames):
    """Near the camera (bottom quarter), labelled pixels show the paint: yellow or white, not asphalt."""
    yellow, white, road = [], [], []
    for f in frames:
        if f.attributes["timeofday"] != "daytime":
            continue
        rgb = np.asarray(f.image, np.float64)
        fg, cat, direction, style = decode_lane(f.lane)
        near = np.zeros_like(fg)
        near[int(SIZE[1] * 0.75):] = True
        is_yellow = fg & near & np.isin(cat, (B.LANE_CATEGORIES.index("double yellow"), B.LANE_CATEGORIES.index("single yellow")))
        is_white = fg & near & (cat == B.LANE_CATEGORIES.index("single white")) & (style == 0) & (direction == 0)
        yellow += list(rgb[is_yellow])
        white += list(rgb[is_white])
        road += list(rgb[near & ~fg & (f.sem == SEM["road"])])
    yellow, white, road = np.mean(yellow, 0), np.mean(white, 0), np.mean(road, 0)
    assert yellow[0] - yellow[2] > 60, yellow  # red well above blue
    assert white.mean() > road.mean() + 60, (white, road)


def test_lane_choices_do_not_move_the_scene():
    """The marking choices come from their own generator: another lane generator, the same scene labels."""
    noise = _NoiseBank(0, *SIZE)
    lanes_differ = 0
    for i in range(6):
        a = render_frame(frame_rngs(0, i)[0], SIZE[0], SIZE[1], noise, np.random.default_rng(1))
        b = render_frame(frame_rngs(0, i)[0], SIZE[0], SIZE[1], noise, np.random.default_rng(2))
        assert (a.sem == b.sem).all() and (a.drv == b.drv).all() and a.labels == b.labels
        lanes_differ += int((a.lane != b.lane).any())
    assert lanes_differ > 0  # the lane generator does choose the markings
