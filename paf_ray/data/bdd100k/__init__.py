"""The one home of BDD100K facts: tasks, class lists, ignore rules, palettes, sizes.

Sources: bdd100k/bdd100k `bdd100k/label/label.py`, `bdd100k/configs/det.toml`, and the
official evaluation code (docs/bdd100k.md says why each fact is what it is). Everything else in paf_ray
imports these names instead of spelling a class list again.
"""

from __future__ import annotations

IMAGE_WIDTH = 1280
IMAGE_HEIGHT = 720
IMAGE_SIZE = (IMAGE_WIDTH, IMAGE_HEIGHT)  # (width, height), as the official evaluation assumes

# The two frame sets: detection, drivable area and lane marking label the 100k frames, semantic
# segmentation the 10k frames (a different set; some frames are in both).
IMAGE_SETS = ("100k", "10k")

# --- detection (labels/det_20) -----------------------------------------------------
# Index i here is COCO category_id i + 1 in the official toolkit.
DET_CLASSES = (
    "pedestrian",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
    "traffic light",
    "traffic sign",
)
# Ignore categories: evaluated as crowd regions of the class on the right, never as classes.
DET_IGNORE_CATEGORIES = {"other person": "pedestrian", "other vehicle": "car", "trailer": "truck"}
# Names from the 2018 release that map onto the current classes.
DET_LEGACY_RENAMES = {
    "person": "pedestrian",
    "bike": "bicycle",
    "motor": "motorcycle",
    "caravan": "car",
    "van": "car",
}

# --- semantic segmentation (labels/sem_seg/masks, Cityscapes train ids) --------------
SEM_CLASSES = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
)
IGNORE_INDEX = 255  # "no label" in every mask we read or write

# Cityscapes palette in train-id order (bdd100k/label/label.py).
SEM_PALETTE = (
    (128, 64, 128),
    (244, 35, 232),
    (70, 70, 70),
    (102, 102, 156),
    (190, 153, 153),
    (153, 153, 153),
    (250, 170, 30),
    (220, 220, 0),
    (107, 142, 35),
    (152, 251, 152),
    (70, 130, 180),
    (220, 20, 60),
    (255, 0, 0),
    (0, 0, 142),
    (0, 0, 70),
    (0, 60, 100),
    (0, 80, 100),
    (0, 0, 230),
    (119, 11, 32),
)

# --- drivable area (labels/drivable/masks) ------------------------------------------
DRV_CLASSES = ("direct", "alternative", "background")
DRV_DIRECT, DRV_ALTERNATIVE, DRV_BACKGROUND = 0, 1, 2
DRV_PALETTE = ((219, 94, 86), (86, 211, 219), (0, 0, 0))
# The official drivable mIoU leaves the background value out (confusion size 3 = excluded).
DRV_OFFICIAL_CLASSES = 2

# --- lane marking (labels/lane/masks) ------------------------------------------------
# One byte per pixel, bit 7 first: - - d s b c c c (bdd100k/label/label.py, label/to_mask.py).
# d (bit 5) direction, s (bit 4) style, c (bits 0-2) category; b (bit 3) set = no lane there.
# The official masks write LANE_BACKGROUND (255) where there is no lane.
LANE_CATEGORIES = (
    "crosswalk",
    "double other",
    "double white",
    "double yellow",
    "road curb",
    "single other",
    "single white",
    "single yellow",
)
LANE_DIRECTIONS = ("parallel", "vertical")  # parallel: along the road; vertical: across it
LANE_STYLES = ("solid", "dashed")
LANE_DIRECTION_BIT = 5
LANE_STYLE_BIT = 4
LANE_BACKGROUND_BIT = 3
LANE_CATEGORY_MASK = 0b111
LANE_BACKGROUND = 255
LANE_PROMPT_NAMES = tuple(f"{c} lane marking" for c in LANE_CATEGORIES)
LANE_PALETTE = ((0, 190, 255), (255, 140, 0), (255, 255, 255), (255, 215, 0), (160, 160, 160), (255, 120, 200),
                (240, 240, 240), (255, 230, 60))

# Detection box colours for overlays: each class in the colour of its segmentation class.
DET_PALETTE = tuple(SEM_PALETTE[SEM_CLASSES.index("person" if c == "pedestrian" else c)] for c in DET_CLASSES)

# --- frame attributes (det_20 "attributes") ----------------------------------------
WEATHERS = ("clear", "overcast", "partly cloudy", "rainy", "snowy", "foggy", "undefined")
SCENES = ("city street", "highway", "residential", "parking lot", "gas stations", "tunnel", "undefined")
TIMES_OF_DAY = ("daytime", "dawn/dusk", "night", "undefined")
TRAFFIC_LIGHT_COLORS = ("NA", "G", "Y", "R")

# The drivable values as CLIP prompts read them (LV-Adapter)
DRV_PROMPT_NAMES = ("direct drivable lane", "alternative drivable lane", "background")

# --- dataset layout -----------------------------------------------------------------
# Where each task's labels live under the root, and which frame set they label.
IMAGES_DIR = "images/{image_set}/{split}"
DET_LABELS = "labels/det_20/det_{split}.json"
SEM_MASKS_DIR = "labels/sem_seg/masks/{split}"
DRV_MASKS_DIR = "labels/drivable/masks/{split}"
LANE_MASKS_DIR = "labels/lane/masks/{split}"
DET_IMAGE_SET = DRV_IMAGE_SET = LANE_IMAGE_SET = "100k"
SEM_IMAGE_SET = "10k"
SPLITS = ("train", "val")


def det_category_to_index(category: str) -> tuple[int, bool] | None:
    """Map a det_20 category to (class index, is_ignore_region); None if it is unknown."""
    category = DET_LEGACY_RENAMES.get(category, category)
    if category in DET_IGNORE_CATEGORIES:
        return DET_CLASSES.index(DET_IGNORE_CATEGORIES[category]), True
    if category in DET_CLASSES:
        return DET_CLASSES.index(category), False
    return None


def lane_byte(category: str, direction: str = "parallel", style: str = "solid") -> int:
    """The lane mask byte of a marking (``set_lane_color`` in bdd100k/label/to_mask.py)."""
    return (LANE_CATEGORIES.index(category) | LANE_STYLES.index(style) << LANE_STYLE_BIT
            | LANE_DIRECTIONS.index(direction) << LANE_DIRECTION_BIT)
