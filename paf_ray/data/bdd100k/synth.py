"""Synthetic BDD100K: procedural road scenes written in exactly the official layout and formats.

Each frame is a perspective view of a straight road (ego lane, neighbouring lanes with
markings, sidewalks), roadside stuff (buildings, walls, fences, trees, terrain, poles,
traffic lights and signs) and traffic (cars, trucks, buses, people, riders on bicycles and
motorcycles). Everything is drawn far to near with PIL polygons into five layers at once:
the RGB frame, the semantic mask, the drivable mask, an instance map and the lane-marking
mask. Boxes are then read off the instance map, so they are tight around the visible part and
agree with the masks. Frame attributes (weather, scene, time of day) change what the frame
looks like.

Lane markings (official byte layout, bdd100k.py): solid white road edges, dashed white lane
boundaries, a double yellow / single yellow solid or dashed centre line, road curbs along the
kerbs where there is a sidewalk, and sometimes a crosswalk (its two edges, "vertical") with a
stop line. Each marking is labelled as the toolkit draws its masks: one thin polyline along the
paint (a dashed line is one polyline across its gaps), up to LANE_LABEL_Z metres; paint hidden by
anything drawn over it is not labelled. The marking choices come from a second generator per
frame (`frame_rngs`), so the scene's draws are those of the generator without lanes.

Frames fall into the 100k set (det, drivable and lane labels) and the 10k set (semantic masks);
some are written, byte-identical, into both sets of their split and so carry all four
tasks, and one or two 10k-train frames reuse a 100k-val stem (the overlap the index can
drop). A completion marker is written last: a root without it is half-written.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from paf_ray.data import bdd100k as B
from paf_ray.data.decode import MAX_IMAGE_PIXELS

COMPLETE_MARKER = ".paf_ray_synth_complete.json"
# Bounds checked before anything is allocated or created. The frames in all: the labels of every
# frame are held until the end (a few KB each), and BDD100K itself has 100k. Rendering takes about
# 65 bytes a pixel (1.1 GB at the 16.8 MP of MAX_IMAGE_PIXELS), so a frame may be no larger than
# what decoding accepts.
MAX_SYNTH_IMAGES = 100_000
MIN_SYNTH_SIZE = (64, 36)
# Bumped when the written dataset changes for the same settings (2: lane masks); a complete root
# made by another version is refused, not reused.
GENERATOR_VERSION = 2

SEM = {name: i for i, name in enumerate(B.SEM_CLASSES)}
VOID = B.IGNORE_INDEX

# Noise amplitude per semantic class (texture strength), index = train id, 255 = void.
_NOISE_AMP = np.full(256, 6, np.int16)
for _name, _amp in {
    "road": 7, "sidewalk": 9, "building": 9, "wall": 10, "fence": 8, "pole": 5,
    "traffic light": 4, "traffic sign": 4, "vegetation": 30, "terrain": 16, "sky": 3,
    "person": 8, "rider": 8, "car": 5, "truck": 6, "bus": 6, "motorcycle": 6, "bicycle": 6,
}.items():
    _NOISE_AMP[SEM[_name]] = _amp
_NOISE_AMP[VOID] = 4

_LANE_SURFACE = np.zeros(256, bool)  # semantic classes a visible lane marking can lie on
_LANE_SURFACE[[SEM["road"], SEM["sidewalk"]]] = True

WEATHER_P = {"clear": 0.45, "overcast": 0.15, "partly cloudy": 0.1, "rainy": 0.12, "snowy": 0.08, "foggy": 0.1}
SCENE_P = {"city street": 0.55, "highway": 0.25, "residential": 0.2}
TIME_P = {"daytime": 0.55, "night": 0.3, "dawn/dusk": 0.15}

CAR_COLORS = ((200, 200, 205), (30, 30, 35), (120, 122, 128), (160, 30, 30), (30, 50, 120), (170, 170, 160), (60, 90, 60))
TRUCK_COLORS = ((225, 225, 220), (180, 60, 40), (60, 80, 140), (200, 170, 60))
BUS_COLORS = ((230, 190, 40), (200, 40, 40), (235, 235, 235), (40, 110, 180))
BUILDING_COLORS = ((150, 90, 70), (165, 160, 150), (200, 185, 150), (110, 110, 120), (175, 130, 100), (90, 85, 80))
SHIRT_COLORS = ((180, 40, 40), (40, 60, 150), (220, 220, 220), (40, 40, 40), (60, 130, 60), (200, 150, 40), (120, 60, 140))


def _pick(rng: np.random.Generator, table: dict[str, float]) -> str:
    names = list(table)
    p = np.array([table[n] for n in names], float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _jitter(rng, color, amount=12):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


@dataclass
class _Object:
    """One labelled object: its category, instance id and the box it would have unoccluded."""

    category: str
    inst: int
    full_box: tuple[float, float, float, float]
    light_color: str = "NA"


@dataclass
class _Canvas:
    """The layers drawn together: frame, semantic mask, drivable mask, instance map, lane mask.

    The lane layer holds the marking labels as the official masks draw them: polylines of a
    constant pixel width along the painted markings (``lane_line``).
    """

    width: int
    height: int
    image: Image.Image
    sem: Image.Image
    drv: Image.Image
    inst: Image.Image
    lane: Image.Image
    objects: list[_Object] = field(default_factory=list)
    glows: list[tuple[tuple[float, float, float, float], tuple[int, int, int]]] = field(default_factory=list)

    def __post_init__(self):
        self.d_img = ImageDraw.Draw(self.image)
        self.d_sem = ImageDraw.Draw(self.sem)
        self.d_drv = ImageDraw.Draw(self.drv)
        self.d_inst = ImageDraw.Draw(self.inst)
        self.d_lane = ImageDraw.Draw(self.lane)
        # ~3 px at 1280 wide, like the official masks' thin polylines; at least 1 px
        self.lane_width = max(1, int(round(3 * self.width / 1280)))

    def lane_line(self, pts, value: int):
        self.d_lane.line([(float(x), float(y)) for x, y in pts], fill=value, width=self.lane_width)

    def poly(self, pts, color, sem=None, drv=None, inst=None):
        pts = [(float(x), float(y)) for x, y in pts]
        self.d_img.polygon(pts, fill=color)
        if sem is not None:
            self.d_sem.polygon(pts, fill=sem)
        if drv is not None:
            self.d_drv.polygon(pts, fill=drv)
        if inst is not None:
            self.d_inst.polygon(pts, fill=inst)

    def ellipse(self, box, color, sem=None, drv=None, inst=None, outline_width=0):
        box = [float(v) for v in box]
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            return
        for draw, value in ((self.d_img, color), (self.d_sem, sem), (self.d_drv, drv), (self.d_inst, inst)):
            if value is None:
                continue
            if outline_width:
                draw.ellipse(box, outline=value, width=outline_width)
            else:
                draw.ellipse(box, fill=value)

    def line(self, pts, color, width, sem=None, drv=None, inst=None):
        pts = [(float(x), float(y)) for x, y in pts]
        width = max(1, int(round(width)))
        for draw, value in ((self.d_img, color), (self.d_sem, sem), (self.d_drv, drv), (self.d_inst, inst)):
            if value is not None:
                draw.line(pts, fill=value, width=width)


@dataclass
class _View:
    """Pinhole camera 1.5 m above a flat ground; X right, Y up, Z forward (metres)."""

    width: int
    height: int
    horizon: float
    vx: float
    focal: float
    cam_height: float = 1.5

    def pt(self, x: float, y: float, z: float) -> tuple[float, float]:
        return self.vx + self.focal * x / z, self.horizon + self.focal * (self.cam_height - y) / z

    @property
    def z_bottom(self) -> float:
        return self.focal * self.cam_height / (self.height - self.horizon)

    def ground(self, x0, x1, z0, z1):
        return [self.pt(x0, 0, z0), self.pt(x1, 0, z0), self.pt(x1, 0, z1), self.pt(x0, 0, z1)]

    def wall(self, x, z0, z1, y0, y1):
        return [self.pt(x, y0, z0), self.pt(x, y0, z1), self.pt(x, y1, z1), self.pt(x, y1, z0)]

    def face(self, x0, x1, y0, y1, z):
        return [self.pt(x0, y0, z), self.pt(x1, y0, z), self.pt(x1, y1, z), self.pt(x0, y1, z)]


def _bbox(pts) -> tuple[float, float, float, float]:
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


# ----------------------------------------------------------------------------- scene parts


def _draw_sky(rng, w, h, horizon, weather, timeofday) -> np.ndarray:
    if timeofday == "night":
        top, bottom = np.array([8, 10, 25]), np.array([30, 30, 45])
    elif timeofday == "dawn/dusk":
        top, bottom = np.array([70, 80, 140]), np.array([240, 150, 90])
    elif weather in ("overcast", "rainy", "snowy", "foggy"):
        top, bottom = np.array([150, 155, 160]), np.array([195, 198, 200])
    else:
        top, bottom = np.array([60, 120, 210]), np.array([170, 200, 235])
    top = top + rng.integers(-10, 11, 3)
    t = np.clip(np.arange(h, dtype=np.float32) / max(horizon, 1.0), 0, 1)[:, None]
    col = (top[None, :] * (1 - t) + bottom[None, :] * t).astype(np.uint8)  # (h, 3)
    return np.broadcast_to(col[:, None, :], (h, w, 3)).copy()


def _draw_clouds(rng, cv: _Canvas, view: _View):
    for _ in range(rng.integers(3, 7)):
        cx = rng.uniform(0, cv.width)
        cy = rng.uniform(0.05, 0.8) * view.horizon
        rx, ry = rng.uniform(0.05, 0.15) * cv.width, rng.uniform(0.02, 0.06) * cv.height
        cv.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), _jitter(rng, (235, 238, 242), 8))


def _draw_skyline(rng, cv: _Canvas, view: _View, scene: str):
    """A far band on the horizon: buildings in the city, trees elsewhere."""
    x = -10.0
    while x < cv.width + 10:
        seg = rng.uniform(0.03, 0.1) * cv.width
        if scene == "city street":
            top = view.horizon - rng.uniform(0.03, 0.14) * cv.height
            cv.poly([(x, view.horizon + 2), (x + seg, view.horizon + 2), (x + seg, top), (x, top)],
                    _jitter(rng, (120, 120, 130), 15), sem=SEM["building"])
        else:
            top = view.horizon - rng.uniform(0.02, 0.06) * cv.height
            cv.ellipse((x - 4, top, x + seg + 4, view.horizon + 6), _jitter(rng, (45, 80, 40), 10), sem=SEM["vegetation"])
            cv.poly([(x, view.horizon + 3), (x + seg, view.horizon + 3), (x + seg, (top + view.horizon) / 2),
                     (x, (top + view.horizon) / 2)], _jitter(rng, (45, 80, 40), 10), sem=SEM["vegetation"])
        x += seg


LANE_LABEL_Z = 80.0  # markings are labelled up to this distance (m); the paint goes on, too thin to label


@dataclass
class _LanePlan:
    """The marking choices of a frame, drawn from the frame's own lane generator (not the scene's)."""

    centre: str  # the line between the directions: "double yellow", "single yellow solid", "single yellow dashed"
    centre_phase: float  # dash phase (m) of a dashed centre line
    crosswalk_z: float | None  # near edge of a crosswalk across the road, or None
    stop_line: bool  # a stop line before the crosswalk, across our direction's lanes


def _plan_lanes(lane_rng, scene: str, layout: dict, crossing_z: float | None, z_bottom: float) -> _LanePlan:
    centre = _pick(lane_rng, {"double yellow": 0.7, "single yellow solid": 0.1, "single yellow dashed": 0.2})
    phase = float(lane_rng.uniform(0, 9))
    p_crosswalk = {"city street": 0.2, "residential": 0.15}.get(scene, 0.0)
    crosswalk_z = None
    if layout["sidewalk"] > 0:
        if crossing_z is not None and lane_rng.random() < 0.6:
            crosswalk_z = max(z_bottom * 1.1, crossing_z - 1.5)  # under the person crossing the road
        elif lane_rng.random() < p_crosswalk:
            crosswalk_z = float(lane_rng.uniform(max(9.0, z_bottom * 1.1), 30.0))
    stop_line = crosswalk_z is not None and crosswalk_z - 1.9 > z_bottom and lane_rng.random() < 0.7
    return _LanePlan(centre, phase, crosswalk_z, stop_line)


def _ground_line(cv: _Canvas, view: _View, x: float, z0: float, z1: float, value: int):
    """A lane label along the ground line X = x from depth z0 to z1."""
    cv.lane_line([view.pt(x, 0, z0), view.pt(x, 0, z1)], value)


def _draw_ground(rng, cv: _Canvas, view: _View, layout: dict, snowy: bool, plan: _LanePlan):
    zn, zf = view.z_bottom * 0.6, 400.0
    zl = LANE_LABEL_Z
    terrain = (215, 218, 222) if snowy else _jitter(rng, (120, 135, 70), 15)
    cv.poly(view.ground(-400, 400, zn, zf), terrain, sem=SEM["terrain"])
    road_c = _jitter(rng, (88, 88, 94) if not snowy else (120, 120, 125), 10)
    lanes = layout["lanes"]  # list of (x0, x1, drivable value)
    x_left, x_right = lanes[0][0], lanes[-1][1]
    if layout["sidewalk"] > 0:
        side_c = _jitter(rng, (150, 146, 140) if not snowy else (205, 205, 210), 10)
        sw = layout["sidewalk"]
        for x0, x1 in ((x_left - sw, x_left), (x_right, x_right + sw)):
            cv.poly(view.ground(x0, x1, zn, zf), side_c, sem=SEM["sidewalk"])
            # kerb
            xk = x1 if x1 <= x_left else x0
            cv.poly(view.ground(xk - 0.12, xk + 0.12, zn, zf), _jitter(rng, (185, 185, 180), 5), sem=SEM["sidewalk"])
    for x0, x1, value in lanes:
        z_end = layout["ego_end"] if value == B.DRV_DIRECT else zf
        cv.poly(view.ground(x0, x1, zn, zf), road_c, sem=SEM["road"], drv=B.DRV_BACKGROUND)
        cv.poly(view.ground(x0, x1, zn, z_end), road_c, sem=SEM["road"], drv=value)
    if layout["sidewalk"] > 0:  # road curbs: the visible kerb faces on both sides of the road
        for xc in (x_left - 0.06, x_right + 0.06):
            _ground_line(cv, view, xc, zn, zl, B.lane_byte("road curb"))
    # markings: solid road edges, dashed lane boundaries, the centre line between the directions
    mark = (225, 225, 220) if not snowy else (235, 235, 235)
    yellow = (225, 190, 40)
    cv.poly(view.ground(x_left + 0.1, x_left + 0.25, zn, zf), mark)
    cv.poly(view.ground(x_right - 0.25, x_right - 0.1, zn, zf), mark)
    for xc in (x_left + 0.175, x_right - 0.175):
        _ground_line(cv, view, xc, zn, zl, B.lane_byte("single white"))
    for i, (x0, x1, _) in enumerate(lanes[:-1]):
        xb = x1
        if i + 1 == layout["n_oncoming"]:
            if plan.centre == "double yellow":
                for dx in (-0.2, 0.08):
                    cv.poly(view.ground(xb + dx, xb + dx + 0.12, zn, zf), yellow)
                    _ground_line(cv, view, xb + dx + 0.06, zn, zl, B.lane_byte("double yellow"))
            elif plan.centre == "single yellow solid":
                cv.poly(view.ground(xb - 0.06, xb + 0.06, zn, zf), yellow)
                _ground_line(cv, view, xb, zn, zl, B.lane_byte("single yellow"))
            else:
                z = view.z_bottom * 0.8 - plan.centre_phase
                while z < 90:
                    cv.poly(view.ground(xb - 0.06, xb + 0.06, max(z, zn), z + 3.0), yellow)
                    z += 9.0
                _ground_line(cv, view, xb, zn, zl, B.lane_byte("single yellow", style="dashed"))
            continue
        z = view.z_bottom * 0.8 - rng.uniform(0, 9)
        while z < 90:
            cv.poly(view.ground(xb - 0.08, xb + 0.08, max(z, zn), z + 3.0), mark)
            z += 9.0
        # one polyline per marking: a dashed line is labelled across its gaps
        _ground_line(cv, view, xb, zn, zl, B.lane_byte("single white", style="dashed"))
    if plan.crosswalk_z is not None:  # zebra stripes across the road; labelled by its two edges
        zc, depth = plan.crosswalk_z, 3.0
        x = x_left + 0.35
        while x + 0.5 < x_right - 0.3:
            cv.poly(view.ground(x, x + 0.5, zc, zc + depth), mark)
            x += 1.1
        for ze in (zc, zc + depth):
            cv.lane_line([view.pt(x_left, 0, ze), view.pt(x_right, 0, ze)], B.lane_byte("crosswalk", "vertical"))
        if plan.stop_line:
            xs = lanes[layout["n_oncoming"]][0]
            cv.poly(view.ground(xs, x_right, zc - 1.9, zc - 1.5), mark)
            cv.lane_line([view.pt(xs, 0, zc - 1.7), view.pt(x_right, 0, zc - 1.7)],
                         B.lane_byte("single white", "vertical"))


def _draw_building(rng, cv: _Canvas, view: _View, x, z0, z1, height, night):
    color = _jitter(rng, BUILDING_COLORS[rng.integers(len(BUILDING_COLORS))], 12)
    cv.poly(view.wall(x, z0, z1, 0, height), color, sem=SEM["building"])
    # windows: a grid in facade coordinates
    win = (35, 40, 55) if not night else (230, 200, 120)
    nz = max(1, int((z1 - z0) / 3.0))
    ny = max(1, int(height / 3.2))
    for iz in range(nz):
        za = z0 + (iz + 0.25) * (z1 - z0) / nz
        zb = z0 + (iz + 0.75) * (z1 - z0) / nz
        for iy in range(ny):
            ya = (iy + 0.35) * height / ny
            yb = (iy + 0.8) * height / ny
            if night and rng.random() < 0.5:
                wc = (40, 40, 50)
            else:
                wc = win
            cv.poly(view.wall(x, za, zb, ya, yb), wc)


def _draw_roadside(rng, cv: _Canvas, view: _View, layout: dict, scene: str, night: bool):
    """Buildings / walls / fences along both sides (they are always behind the traffic)."""
    x_left = layout["lanes"][0][0] - layout["sidewalk"]
    x_right = layout["lanes"][-1][1] + layout["sidewalk"]
    for side, xe in ((-1, x_left), (1, x_right)):
        z = view.z_bottom * 0.7
        if scene == "city street":
            while z < 120:
                length = rng.uniform(8, 25)
                _draw_building(rng, cv, view, xe + side * rng.uniform(0.2, 2.0), z, z + length, rng.uniform(7, 25), night)
                z += length
        elif scene == "residential":
            while z < 100:
                length = rng.uniform(8, 14)
                xh = xe + side * rng.uniform(4, 7)
                if rng.random() < 0.7:
                    _draw_building(rng, cv, view, xh, z, z + length, rng.uniform(4, 8), night)
                z += length + rng.uniform(3, 10)
            if rng.random() < 0.6:
                cv.poly(view.wall(xe + side * 0.3, view.z_bottom * 0.7, 80, 0, 0.9), _jitter(rng, (175, 165, 145), 10),
                        sem=SEM["wall"])
        else:  # highway: a fence along the verge
            if rng.random() < 0.8:
                xf = xe + side * rng.uniform(1.5, 3.0)
                fc = _jitter(rng, (125, 120, 110), 10)
                cv.poly(view.wall(xf, view.z_bottom * 0.7, 150, 0.9, 1.15), fc, sem=SEM["fence"])
                zp = view.z_bottom * 0.7
                while zp < 90:
                    cv.poly(view.wall(xf, zp, zp + 0.25, 0, 1.2), fc, sem=SEM["fence"])
                    zp += 4.0


def _draw_tree(rng, cv: _Canvas, view: _View, x, z, snowy):
    h = rng.uniform(4, 9)
    r = rng.uniform(1.2, 2.5)
    trunk = view.face(x - 0.15, x + 0.15, 0, h * 0.55, z)
    cv.poly(trunk, _jitter(rng, (80, 60, 40), 10), sem=SEM["vegetation"], drv=B.DRV_BACKGROUND, inst=0)
    cx, cy = view.pt(x, h - r, z)
    rp = view.focal * r / z
    crown = (190, 200, 190) if snowy and rng.random() < 0.5 else _jitter(rng, (50, 95, 40), 15)
    cv.ellipse((cx - rp, cy - rp * 1.2, cx + rp, cy + rp), crown, sem=SEM["vegetation"], drv=B.DRV_BACKGROUND, inst=0)


def _draw_box_vehicle(rng, cv: _Canvas, view: _View, obj_id, category, x, z, oncoming, night):
    """Car / truck / bus as a lit 3-D box: the face towards the camera plus the visible side."""
    dims = {"car": (1.8, 1.5, 4.3), "truck": (2.5, 3.3, 7.5), "bus": (2.55, 3.1, 11.0)}[category]
    w, h, length = dims
    w *= rng.uniform(0.93, 1.07)
    h *= rng.uniform(0.93, 1.07)
    colors = {"car": CAR_COLORS, "truck": TRUCK_COLORS, "bus": BUS_COLORS}[category]
    body = _jitter(rng, colors[rng.integers(len(colors))], 10)
    side_c = tuple(int(c * 0.78) for c in body)
    sem, inst, drv = SEM[category], obj_id, B.DRV_BACKGROUND
    x0, x1 = x - w / 2, x + w / 2
    clear = 0.25 if category == "car" else 0.45  # ground clearance
    pts = []
    # side face (the one facing the camera's line of sight)
    side_x = x0 if x0 > 0 else (x1 if x1 < 0 else None)
    if side_x is not None:
        cab_z0, cab_z1 = (z + 0.25 * length, z + 0.75 * length) if category == "car" else (z, z + length)
        low_h = 0.62 * h if category == "car" else h
        side = view.wall(side_x, z, z + length, clear, low_h)
        cv.poly(side, side_c, sem, drv, inst)
        pts += side
        if category == "car":
            cab = view.wall(side_x, cab_z0, cab_z1, low_h - 0.01, h)
            cv.poly(cab, (40, 45, 55), sem, drv, inst)
            pts += cab
        elif category == "bus":
            cv.poly(view.wall(side_x, z + 0.5, z + length - 0.5, 0.55 * h, 0.85 * h), (35, 40, 50))
        for wz in (z + 0.18 * length, z + 0.82 * length):
            wheel = view.wall(side_x, wz - 0.35, wz + 0.35, 0, 0.65)
            cv.poly(wheel, (20, 20, 22), sem, drv, inst)
            pts += wheel
    # roof, seen from above when the object is lower than the camera
    if h < view.cam_height:
        top_w = 0.75 * w if category == "car" else w
        roof = [view.pt(x - top_w / 2, h, z + 0.3 * length), view.pt(x + top_w / 2, h, z + 0.3 * length),
                view.pt(x + top_w / 2, h, z + 0.75 * length), view.pt(x - top_w / 2, h, z + 0.75 * length)]
        cv.poly(roof, tuple(int(c * 0.9) for c in body), sem, drv, inst)
        pts += roof
    # wheels under the near face
    for wx in (x0 + 0.05, x1 - 0.3):
        wheel = view.face(wx, wx + 0.25, 0, clear + 0.1, z)
        cv.poly(wheel, (20, 20, 22), sem, drv, inst)
        pts += wheel
    # near face
    if category == "car":
        low = view.face(x0, x1, clear, 0.62 * h, z)
        cab = [view.pt(x0 + 0.1 * w, 0.62 * h, z), view.pt(x1 - 0.1 * w, 0.62 * h, z),
               view.pt(x1 - 0.2 * w, h, z), view.pt(x0 + 0.2 * w, h, z)]
        cv.poly(low, body, sem, drv, inst)
        cv.poly(cab, body, sem, drv, inst)
        glass = [view.pt(x0 + 0.15 * w, 0.66 * h, z), view.pt(x1 - 0.15 * w, 0.66 * h, z),
                 view.pt(x1 - 0.23 * w, 0.95 * h, z), view.pt(x0 + 0.23 * w, 0.95 * h, z)]
        cv.poly(glass, (45, 55, 70))
        pts += low + cab
        light_y = (0.42 * h, 0.55 * h)
    else:
        face = view.face(x0, x1, clear, h, z)
        cv.poly(face, body, sem, drv, inst)
        pts += face
        if category == "bus" or oncoming:
            cv.poly(view.face(x0 + 0.1, x1 - 0.1, 0.55 * h, 0.9 * h, z), (40, 45, 55))
        else:
            cv.poly(view.face(x - 0.03, x + 0.03, clear + 0.1, h - 0.1, z), tuple(int(c * 0.6) for c in body))
        light_y = (clear + 0.2, clear + 0.4)
    lamp = (245, 245, 220) if oncoming else (200, 20, 20)
    for lx0, lx1 in ((x0 + 0.08, x0 + 0.35), (x1 - 0.35, x1 - 0.08)):
        box = view.face(lx0, lx1, light_y[0], light_y[1], z)
        cv.poly(box, lamp)
        if night:
            bx = _bbox(box)
            pad = (bx[2] - bx[0]) * 0.25
            cv.glows.append(((bx[0] - pad, bx[1] - pad, bx[2] + pad, bx[3] + pad), (255, 250, 220) if oncoming else (255, 40, 30)))
    cv.poly(view.face(x - 0.25, x + 0.25, light_y[0] - 0.25, light_y[0] - 0.05, z), (230, 230, 230))
    cv.objects.append(_Object(category, obj_id, _bbox(pts)))


def _draw_person(rng, cv: _Canvas, view: _View, obj_id, x, z, category="pedestrian", base_y=0.0, seated=False):
    h = rng.uniform(1.6, 1.9) * (0.75 if seated else 1.0)
    w = 0.5
    sem = SEM["person"] if category == "pedestrian" else SEM["rider"]
    shirt = _jitter(rng, SHIRT_COLORS[rng.integers(len(SHIRT_COLORS))], 15)
    pants = _jitter(rng, (50, 50, 70), 15)
    skin = _jitter(rng, (200, 160, 130), 25)
    drv = B.DRV_BACKGROUND
    y0 = base_y
    leg_top = y0 + (0.25 if seated else 0.47) * h
    pts = []
    step = rng.uniform(-0.08, 0.08)
    for lx in (x - 0.2 + step, x + 0.03 - step):
        leg = view.face(lx, lx + 0.17, y0, leg_top, z)
        cv.poly(leg, pants, sem, drv, obj_id)
        pts += leg
    torso = [view.pt(x - w / 2, leg_top, z), view.pt(x + w / 2, leg_top, z),
             view.pt(x + w / 2 + 0.02, y0 + 0.82 * h, z), view.pt(x - w / 2 - 0.02, y0 + 0.82 * h, z)]
    cv.poly(torso, shirt, sem, drv, obj_id)
    pts += torso
    hx, hy = view.pt(x, y0 + 0.91 * h, z)
    hr = view.focal * 0.11 * h / z
    cv.ellipse((hx - hr * 0.8, hy - hr, hx + hr * 0.8, hy + hr), skin, sem, drv, obj_id)
    pts += [(hx - hr * 0.8, hy - hr), (hx + hr * 0.8, hy + hr)]
    cv.objects.append(_Object(category, obj_id, _bbox(pts)))


def _draw_two_wheeler(rng, cv: _Canvas, view: _View, obj_id, rider_id, category, x, z):
    """Bicycle / motorcycle in side view, optionally with a rider (its own box)."""
    length = 1.75 if category == "bicycle" else 2.0
    r = 0.34 if category == "bicycle" else 0.32
    sem, drv = SEM[category], B.DRV_BACKGROUND
    frame = _jitter(rng, SHIRT_COLORS[rng.integers(len(SHIRT_COLORS))], 20)
    direction = 1 if rng.random() < 0.5 else -1
    xa, xb = x - direction * length / 2 + direction * r, x + direction * length / 2 - direction * r
    rp = view.focal * r / z
    lw = max(1.0, view.focal * (0.05 if category == "bicycle" else 0.12) / z)
    pts = []
    for wx in (xa, xb):
        cx, cy = view.pt(wx, r, z)
        cv.ellipse((cx - rp, cy - rp, cx + rp, cy + rp), (25, 25, 25), sem, drv, obj_id, outline_width=int(max(1, lw)))
        pts += [(cx - rp, cy - rp), (cx + rp, cy + rp)]
    if category == "bicycle":
        seat, bar = view.pt(x - direction * 0.15, 0.95, z), view.pt(xb - direction * 0.1, 1.0, z)
        crank = view.pt(x, r, z)
        for a, b in ((view.pt(xa, r, z), seat), (seat, crank), (crank, bar), (bar, view.pt(xb, r, z)), (seat, bar)):
            cv.line([a, b], frame, lw, sem, drv, obj_id)
        pts += [seat, bar]
    else:
        body = [view.pt(xa, r + 0.1, z), view.pt(xb, r + 0.1, z), view.pt(xb - direction * 0.15, 1.05, z),
                view.pt(xa + direction * 0.2, 0.85, z)]
        cv.poly(body, frame, sem, drv, obj_id)
        pts += body
    cv.objects.append(_Object(category, obj_id, _bbox(pts)))
    if rider_id:
        _draw_person(rng, cv, view, rider_id, x, z - 0.05, category="rider", base_y=0.6, seated=True)


def _draw_pole_light(rng, cv: _Canvas, view: _View, obj_id, x, z, side, night):
    pole_c = _jitter(rng, (95, 95, 100), 10)
    drv = B.DRV_BACKGROUND
    cv.poly(view.face(x - 0.09, x + 0.09, 0, 5.6, z), pole_c, SEM["pole"], drv, 0)
    arm_x = x - side * rng.uniform(2.0, 4.0)
    cv.poly([view.pt(x, 5.5, z), view.pt(arm_x, 5.5, z), view.pt(arm_x, 5.65, z), view.pt(x, 5.65, z)],
            pole_c, SEM["pole"], drv, 0)
    housing = view.face(arm_x - 0.2, arm_x + 0.2, 4.4, 5.5, z)
    cv.poly(housing, (30, 30, 30), SEM["traffic light"], drv, obj_id)
    color = ("R", "Y", "G")[rng.integers(3)]
    lit = {"R": (255, 40, 30), "Y": (255, 200, 30), "G": (40, 255, 120)}[color]
    for i, c in enumerate("RYG"):
        cx, cy = view.pt(arm_x, 5.3 - i * 0.35, z)
        rp = view.focal * 0.12 / z
        cv.ellipse((cx - rp, cy - rp, cx + rp, cy + rp), lit if c == color else (60, 60, 55))
        if c == color and night:
            cv.glows.append(((cx - 3 * rp, cy - 3 * rp, cx + 3 * rp, cy + 3 * rp), lit))
    cv.objects.append(_Object("traffic light", obj_id, _bbox(housing), light_color=color))


def _draw_sign(rng, cv: _Canvas, view: _View, obj_id, x, z):
    drv = B.DRV_BACKGROUND
    cv.poly(view.face(x - 0.05, x + 0.05, 0, 2.3, z), (110, 110, 115), SEM["pole"], drv, 0)
    kind = rng.integers(3)
    s = 0.4
    cx, cy = view.pt(x, 2.6, z)
    sp = view.focal * s / z
    if kind == 0:  # round prohibition sign
        cv.ellipse((cx - sp, cy - sp, cx + sp, cy + sp), (200, 30, 30), SEM["traffic sign"], drv, obj_id)
        cv.ellipse((cx - 0.7 * sp, cy - 0.7 * sp, cx + 0.7 * sp, cy + 0.7 * sp), (240, 240, 240))
        pts = [(cx - sp, cy - sp), (cx + sp, cy + sp)]
    elif kind == 1:  # warning triangle
        pts = [(cx - sp, cy + sp * 0.8), (cx + sp, cy + sp * 0.8), (cx, cy - sp)]
        cv.poly(pts, (210, 30, 30), SEM["traffic sign"], drv, obj_id)
        cv.poly([(cx - sp * 0.6, cy + sp * 0.55), (cx + sp * 0.6, cy + sp * 0.55), (cx, cy - sp * 0.45)], (245, 245, 240))
    else:  # rectangular information sign
        pts = [(cx - sp, cy - sp * 0.8), (cx + sp, cy - sp * 0.8), (cx + sp, cy + sp * 0.8), (cx - sp, cy + sp * 0.8)]
        cv.poly(pts, _jitter(rng, (30, 80, 170), 10) if rng.random() < 0.6 else (30, 120, 60), SEM["traffic sign"], drv, obj_id)
        cv.poly([(cx - sp * 0.6, cy - sp * 0.2), (cx + sp * 0.6, cy - sp * 0.2), (cx + sp * 0.6, cy + sp * 0.2),
                 (cx - sp * 0.6, cy + sp * 0.2)], (235, 235, 235))
    cv.objects.append(_Object("traffic sign", obj_id, _bbox(pts)))


def _draw_street_lamp(rng, cv: _Canvas, view: _View, x, z, side, night):
    c = _jitter(rng, (120, 120, 125), 10)
    cv.poly(view.face(x - 0.08, x + 0.08, 0, 7.0, z), c, SEM["pole"], B.DRV_BACKGROUND, 0)
    head = [view.pt(x, 6.9, z), view.pt(x - side * 1.5, 6.9, z), view.pt(x - side * 1.5, 7.05, z), view.pt(x, 7.05, z)]
    cv.poly(head, c, SEM["pole"], B.DRV_BACKGROUND, 0)
    if night:
        lx, ly = view.pt(x - side * 1.3, 6.85, z)
        r = view.focal * 0.5 / z
        cv.glows.append(((lx - r, ly - r, lx + r, ly + r), (255, 220, 150)))


# ----------------------------------------------------------------------------- one frame


@dataclass
class SynthFrame:
    image: Image.Image  # RGB
    sem: np.ndarray  # uint8 (H, W)
    drv: np.ndarray  # uint8 (H, W)
    lane: np.ndarray  # uint8 (H, W), official lane bytes (255 = no lane)
    labels: list[dict]  # det_20 style
    attributes: dict


class _NoiseBank:
    """Pre-drawn noise fields; each frame takes a random window (cheap, vectorised texture)."""

    def __init__(self, seed: int, width: int, height: int, count: int = 3):
        rng = np.random.default_rng([seed, 7])
        self.pad = 48
        shape = (height + self.pad, width + self.pad)
        fine = rng.standard_normal((count, *shape)).astype(np.float32)
        self.fine = np.clip(fine * 0.6, -2.5, 2.5).astype(np.float16)
        small = rng.standard_normal((count, shape[0] // 8 + 1, shape[1] // 8 + 1)).astype(np.float32)
        coarse = []
        for s in small:
            im = Image.fromarray(((np.clip(s, -3, 3) + 3) * 42).astype(np.uint8)).resize((shape[1], shape[0]), Image.BILINEAR)
            coarse.append((np.asarray(im, np.float32) / 42 - 3))
        self.coarse = np.stack(coarse).astype(np.float16)

    def window(self, rng, which: str, h: int, w: int) -> np.ndarray:
        bank = self.fine if which == "fine" else self.coarse
        k = rng.integers(len(bank))
        oy, ox = rng.integers(0, self.pad, 2)
        return bank[k, oy:oy + h, ox:ox + w]


def frame_rngs(seed: int, index: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Frame `index`'s scene generator and its lane-marking generator (separate, so that the
    marking choices do not shift the scene's draws)."""
    return np.random.default_rng([seed, 100, index]), np.random.default_rng([seed, 101, index])


def render_frame(rng: np.random.Generator, width: int, height: int, noise: _NoiseBank,
                 lane_rng: np.random.Generator) -> SynthFrame:
    weather, scene, timeofday = _pick(rng, WEATHER_P), _pick(rng, SCENE_P), _pick(rng, TIME_P)
    night = timeofday == "night"
    snowy = weather == "snowy"
    view = _View(width, height, horizon=height * rng.uniform(0.4, 0.48), vx=width * rng.uniform(0.44, 0.56),
                 focal=width * rng.uniform(0.8, 0.95))

    # lanes: oncoming on the left, then ours (ego = direct), then same-direction lanes on the right
    lane_w = rng.uniform(3.2, 3.8)
    n_oncoming = int(rng.choice([0, 1, 2], p=[0.25, 0.5, 0.25])) if scene != "highway" else int(rng.integers(0, 3))
    n_right = int(rng.integers(0, 3 if scene == "highway" else 2))
    n_left_same = int(rng.integers(0, 2)) if scene == "highway" else 0
    offset = rng.uniform(-0.5, 0.5)
    ego_x0 = -lane_w / 2 + offset
    lanes = []
    n_left = n_oncoming + n_left_same
    for i in range(n_left, 0, -1):
        lanes.append((ego_x0 - i * lane_w, ego_x0 - (i - 1) * lane_w, B.DRV_ALTERNATIVE))
    lanes.append((ego_x0, ego_x0 + lane_w, B.DRV_DIRECT))
    for i in range(n_right):
        lanes.append((ego_x0 + (i + 1) * lane_w, ego_x0 + (i + 2) * lane_w, B.DRV_ALTERNATIVE))
    layout = {"lanes": lanes, "n_oncoming": n_oncoming, "sidewalk": 0.0 if scene == "highway" else rng.uniform(2.5, 4.0),
              "ego_end": 400.0}

    # traffic: per lane, objects at increasing distance
    traffic = []  # (z, kind, x, lane_index)
    for li, (x0, x1, value) in enumerate(lanes):
        z = rng.uniform(6.5, 14)
        while z < 48:
            if rng.random() < (0.55 if value == B.DRV_DIRECT else 0.6):
                kind = _pick(rng, {"car": 0.66, "truck": 0.12, "bus": 0.08, "motorcycle": 0.07, "bicycle": 0.07})
                xc = (x0 + x1) / 2 + rng.uniform(-0.35, 0.35)
                traffic.append((z, kind, xc, li))
                z += {"car": 4.3, "truck": 7.5, "bus": 11.0}.get(kind, 2.0)
            z += rng.uniform(6, 16)
    ego_li = [i for i, l in enumerate(lanes) if l[2] == B.DRV_DIRECT][0]
    ego_z = [t[0] for t in traffic if t[3] == ego_li]
    if ego_z:
        layout["ego_end"] = min(ego_z)

    x_left, x_right = lanes[0][0], lanes[-1][1]
    sw = layout["sidewalk"]
    side_items = []  # (z, kind, x, side)
    for side, xe in ((-1, x_left), (1, x_right)):
        if sw > 0:
            for _ in range(rng.integers(0, 3)):
                side_items.append((rng.uniform(6, 35), "pedestrian", xe + side * rng.uniform(0.6, sw - 0.3), side))
            if rng.random() < 0.2:
                side_items.append((rng.uniform(7, 25), "parked bicycle", xe + side * rng.uniform(0.8, sw - 0.8), side))
        if rng.random() < (0.55 if scene == "city street" else 0.25):
            side_items.append((rng.uniform(12, 40), "traffic light", xe + side * 0.4, side))
        for _ in range(rng.integers(0, 3)):
            side_items.append((rng.uniform(8, 45), "sign", xe + side * rng.uniform(0.3, 0.7), side))
        for _ in range(rng.integers(0, 3)):
            side_items.append((rng.uniform(8, 60), "lamp", xe + side * 0.3, side))
        if scene != "city street":
            for _ in range(rng.integers(1, 5)):
                side_items.append((rng.uniform(8, 70), "tree", xe + side * rng.uniform(sw + 1.0, sw + 6.0), side))
    if sw > 0 and rng.random() < 0.25:  # someone crossing the road
        side_items.append((rng.uniform(8, 25), "pedestrian", rng.uniform(x_left + 1, x_right - 1), 0))
    if rng.random() < 0.1:  # an ignore region: a far-away crowd-ish "other person"
        side_items.append((rng.uniform(15, 35), "other person", x_right + 0.8 if sw > 0 else x_left - 1.5, 1))
    crossing = [z for z, kind, _, side in side_items if kind == "pedestrian" and side == 0]
    plan = _plan_lanes(lane_rng, scene, layout, crossing[0] if crossing else None, view.z_bottom)

    # --- draw: background layer, then everything else far to near
    img = _draw_sky(rng, width, height, view.horizon, weather, timeofday)
    cv = _Canvas(width, height, Image.fromarray(img), Image.new("L", (width, height), SEM["sky"]),
                 Image.new("L", (width, height), B.DRV_BACKGROUND), Image.new("L", (width, height), 0),
                 Image.new("L", (width, height), B.LANE_BACKGROUND))
    if weather == "partly cloudy" and not night:
        _draw_clouds(rng, cv, view)
    _draw_skyline(rng, cv, view, scene)
    _draw_ground(rng, cv, view, layout, snowy, plan)
    _draw_roadside(rng, cv, view, layout, scene, night)

    items = [(z, kind, x, li, "traffic") for z, kind, x, li in traffic]
    items += [(z, kind, x, side, "side") for z, kind, x, side in side_items]
    items.sort(key=lambda t: -t[0])
    next_id = 1
    for z, kind, x, extra, _ in items:
        if kind in ("car", "truck", "bus"):
            oncoming = extra < n_oncoming
            _draw_box_vehicle(rng, cv, view, next_id, kind, x, z, oncoming, night)
            next_id += 1
        elif kind in ("motorcycle", "bicycle"):
            _draw_two_wheeler(rng, cv, view, next_id, next_id + 1, kind, x, z)
            next_id += 2
        elif kind == "parked bicycle":
            _draw_two_wheeler(rng, cv, view, next_id, 0, "bicycle", x, z)
            next_id += 1
        elif kind in ("pedestrian", "other person"):
            _draw_person(rng, cv, view, next_id, x, z, category=kind)
            next_id += 1
        elif kind == "traffic light":
            _draw_pole_light(rng, cv, view, next_id, x, z, extra, night)
            next_id += 1
        elif kind == "sign":
            _draw_sign(rng, cv, view, next_id, x, z)
            next_id += 1
        elif kind == "lamp":
            _draw_street_lamp(rng, cv, view, x, z, extra, night)
        elif kind == "tree":
            _draw_tree(rng, cv, view, x, z, snowy)
        if next_id > 250:
            break

    # ego-vehicle hood: void in the semantic mask, background in the drivable mask
    if rng.random() < 0.3:
        hood_top = height * rng.uniform(0.88, 0.94)
        hood = [(-5, height + 5), (width + 5, height + 5), (width * 0.85, hood_top), (width * 0.15, hood_top)]
        cv.poly(hood, _jitter(rng, CAR_COLORS[rng.integers(len(CAR_COLORS))], 10), sem=VOID, drv=B.DRV_BACKGROUND, inst=0)

    sem = np.asarray(cv.sem)
    drv = np.asarray(cv.drv)
    inst = np.asarray(cv.inst)
    # Paint hidden by anything drawn over it (traffic, people, poles, the hood) is not labelled,
    # as annotators label only the markings they see: keep lane pixels on road or kerb/sidewalk.
    lane = np.where(_LANE_SURFACE[sem], np.asarray(cv.lane), np.uint8(B.LANE_BACKGROUND)).astype(np.uint8)

    # --- texture, light and weather (vectorised)
    rgb = np.asarray(cv.image, np.float32)
    amp = _NOISE_AMP[sem].astype(np.float32)
    rgb += (noise.window(rng, "fine", height, width) * amp)[..., None]
    rgb += (noise.window(rng, "coarse", height, width) * (amp * 0.6 + 3))[..., None]
    if timeofday == "night":
        rgb *= 0.4
        rgb += np.array([0, 0, 6], np.float32)
    elif timeofday == "dawn/dusk":
        rgb = rgb * 0.72 + np.array([30, 12, -5], np.float32)
    if weather == "overcast" or weather == "rainy":
        grey = rgb.mean(axis=2, keepdims=True)
        rgb = rgb * 0.6 + grey * 0.4
        rgb *= 0.85
    if weather == "foggy":
        rows = np.arange(height, dtype=np.float32)
        depth = np.clip((rows - view.horizon) / (height - view.horizon), 0, 1)
        alpha = (0.75 * (1 - depth) ** 2 + 0.15)[:, None, None]
        fog = np.array([180, 182, 185], np.float32) * (0.35 if night else 1.0)
        rgb = rgb * (1 - alpha) + fog * alpha
    frame = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))

    if cv.glows or weather in ("rainy", "snowy"):
        d = ImageDraw.Draw(frame)
        for box, color in cv.glows:
            d.ellipse(box, fill=color)
        if weather == "rainy":
            n = int(width * height / 900)
            xs, ys = rng.uniform(0, width, n), rng.uniform(0, height, n)
            length = height * 0.04
            for x, y in zip(xs, ys):
                d.line([(x, y), (x - length * 0.15, y + length)], fill=(170, 175, 185), width=1)
        elif weather == "snowy":
            n = int(width * height / 600)
            xs, ys = rng.uniform(0, width, n), rng.uniform(0, height, n)
            r = max(1.0, width / 640)
            for x, y in zip(xs, ys):
                d.ellipse((x - r, y - r, x + r, y + r), fill=(240, 240, 245))
        if weather == "rainy":
            frame = frame.filter(ImageFilter.BoxBlur(0.6))

    # --- boxes from the instance map: tight around what is visible
    labels = []
    for obj in cv.objects:
        fx0, fy0, fx1, fy1 = obj.full_box
        x0, y0 = max(0, int(math.floor(fx0)) - 1), max(0, int(math.floor(fy0)) - 1)
        x1, y1 = min(width, int(math.ceil(fx1)) + 2), min(height, int(math.ceil(fy1)) + 2)
        if x1 <= x0 or y1 <= y0:
            continue
        visible = inst[y0:y1, x0:x1] == obj.inst
        count = int(visible.sum())
        if count < 12:
            continue
        cols = np.flatnonzero(visible.any(axis=0))
        rows = np.flatnonzero(visible.any(axis=1))
        bx0, bx1 = x0 + cols[0], x0 + cols[-1] + 1
        by0, by1 = y0 + rows[0], y0 + rows[-1] + 1
        if bx1 - bx0 < 3 or by1 - by0 < 3:
            continue
        full_area = max(1e-6, (min(fx1, width) - max(fx0, 0)) * (min(fy1, height) - max(fy0, 0)))
        truncated = fx0 < 0 or fy0 < 0 or fx1 > width or fy1 > height
        occluded = (bx1 - bx0) * (by1 - by0) < 0.85 * full_area
        labels.append({
            "id": str(len(labels)),
            "category": obj.category,
            "attributes": {"occluded": bool(occluded), "truncated": bool(truncated), "trafficLightColor": obj.light_color},
            "box2d": {"x1": float(bx0), "y1": float(by0), "x2": float(bx1 - 1), "y2": float(by1 - 1)},
        })
    return SynthFrame(frame, sem, drv, lane, labels, {"weather": weather, "scene": scene, "timeofday": timeofday})


# ----------------------------------------------------------------------------- the dataset


def _frame_sets(n: int) -> list[str]:
    """Which image sets each frame of a split goes to: '100k', '10k' or 'both' (fixed cycle)."""
    cycle = ("100k", "10k", "both", "100k", "10k", "100k", "both", "100k", "10k", "100k")
    return [cycle[i % len(cycle)] for i in range(n)]


def _stem(rng: np.random.Generator) -> str:
    a, b = rng.integers(0, 2**32, 2)
    return f"{int(a):08x}-{int(b):08x}"


def _encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def check_synth_settings(images: int, size, val_fraction: float, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """ValueError (one line) unless a synthetic dataset of these settings can be made within bounds."""
    width, height = int(size[0]), int(size[1])
    if not 1 <= images <= MAX_SYNTH_IMAGES:
        raise ValueError(f"images must be 1..{MAX_SYNTH_IMAGES}, got {images}")
    if width < MIN_SYNTH_SIZE[0] or height < MIN_SYNTH_SIZE[1]:
        raise ValueError(f"size must be at least {MIN_SYNTH_SIZE[0]}x{MIN_SYNTH_SIZE[1]}, got {width}x{height}")
    if width * height > max_pixels:
        raise ValueError(f"size {width}x{height} = {width * height} pixels is over the image limit of "
                         f"{max_pixels} (data.max_image_pixels)")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def write_synthetic(out: str, images: int, seed: int = 0, size=(640, 360), val_fraction: float = 0.25,
                    max_pixels: int = MAX_IMAGE_PIXELS) -> str:
    """Write a synthetic BDD100K root at `out` (official layout and formats); return its path.

    Refuses a non-empty folder unless it is a complete synthetic root made with the same
    settings (then it is reused as is). The settings are checked before anything is written; the
    root is written into a temporary sibling folder and renamed into place at the end, so a
    synth that fails leaves nothing behind.
    """
    check_synth_settings(images, size, val_fraction, max_pixels)
    width, height = int(size[0]), int(size[1])
    params = {"images": int(images), "seed": int(seed), "size": [width, height], "val_fraction": float(val_fraction),
              "generator": GENERATOR_VERSION}
    out = os.path.abspath(out)
    marker = os.path.join(out, COMPLETE_MARKER)
    if os.path.exists(marker):
        try:
            with open(marker, encoding="utf-8") as f:
                done = json.load(f)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{marker}: corrupt ({type(e).__name__}: {str(e)[:80]}); remove the folder") from None
        made = done.get("params") if isinstance(done, dict) else None
        if made == params:
            return out
        raise ValueError(f"{out}: already holds a synthetic dataset made with {made}, not {params}")
    if os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out}: folder is not empty and has no completion marker ({COMPLETE_MARKER}); "
                         "choose an empty or new folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out}: exists and is not a folder")
    parent = os.path.dirname(out)
    created = None if os.path.isdir(parent) else parent  # the outermost folder this call creates, if any
    while created and not os.path.isdir(os.path.dirname(created)):
        created = os.path.dirname(created)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_stale_temps(parent, os.path.basename(out))
        shutil.rmtree(tmp, ignore_errors=True)  # ours, left by an earlier process of the same pid
        _write_root(tmp, params)
        os.replace(tmp, out)  # also replaces an empty folder `out`
    except BaseException:
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _remove_stale_temps(parent: str, name: str) -> None:
    """Temporary folders of synths of `name` whose process is gone (killed before it could clean up)."""
    prefix = f".{name}.tmp-"
    for entry in os.listdir(parent):
        pid = entry[len(prefix):]
        if entry.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _write_root(out: str, params: dict) -> None:
    images, seed, val_fraction = params["images"], params["seed"], params["val_fraction"]
    width, height = params["size"]
    marker = os.path.join(out, COMPLETE_MARKER)
    for split in B.SPLITS:
        for image_set in ("100k", "10k"):
            os.makedirs(os.path.join(out, B.IMAGES_DIR.format(image_set=image_set, split=split)), exist_ok=True)
        os.makedirs(os.path.join(out, B.SEM_MASKS_DIR.format(split=split)), exist_ok=True)
        os.makedirs(os.path.join(out, B.DRV_MASKS_DIR.format(split=split)), exist_ok=True)
        os.makedirs(os.path.join(out, B.LANE_MASKS_DIR.format(split=split)), exist_ok=True)
    os.makedirs(os.path.join(out, os.path.dirname(B.DET_LABELS)), exist_ok=True)

    n_val = int(round(images * val_fraction))
    if val_fraction > 0 and images >= 4:
        n_val = max(1, n_val)
    n_train = images - n_val
    noise = _NoiseBank(seed, width, height)
    name_rng = np.random.default_rng([seed, 1])
    det = {"train": [], "val": []}
    counts = {f"{s}/{k}": 0 for s in B.SPLITS for k in ("100k", "10k")}
    overlap_left = 1 if images < 40 else 2
    overlap_stems = []

    for split, n, start in (("train", n_train, 0), ("val", n_val, n_train)):
        for j, image_set in enumerate(_frame_sets(n)):
            index = start + j
            scene_rng, lane_rng = frame_rngs(seed, index)
            frame = render_frame(scene_rng, width, height, noise, lane_rng)
            stem = _stem(name_rng)
            buf = io.BytesIO()
            frame.image.save(buf, format="JPEG", quality=90)
            jpeg = buf.getvalue()
            sets = ("100k", "10k") if image_set == "both" else (image_set,)
            for s in sets:
                _write(os.path.join(out, B.IMAGES_DIR.format(image_set=s, split=split), stem + ".jpg"), jpeg)
                counts[f"{split}/{s}"] += 1
            if "100k" in sets:
                _write(os.path.join(out, B.DRV_MASKS_DIR.format(split=split), stem + ".png"), _encode_png(frame.drv))
                _write(os.path.join(out, B.LANE_MASKS_DIR.format(split=split), stem + ".png"), _encode_png(frame.lane))
                det[split].append({"name": stem + ".jpg", "attributes": frame.attributes, "timestamp": 10000,
                                   "labels": frame.labels})
            sem_png = _encode_png(frame.sem)
            if "10k" in sets:
                _write(os.path.join(out, B.SEM_MASKS_DIR.format(split=split), stem + ".png"), sem_png)
            if split == "val" and image_set == "100k" and overlap_left > 0:
                # the same frame (same stem, same bytes) also sits in 10k-train, as in the real data
                _write(os.path.join(out, B.IMAGES_DIR.format(image_set="10k", split="train"), stem + ".jpg"), jpeg)
                _write(os.path.join(out, B.SEM_MASKS_DIR.format(split="train"), stem + ".png"), sem_png)
                counts["train/10k"] += 1
                overlap_stems.append(stem)
                overlap_left -= 1

    for split in B.SPLITS:
        with open(os.path.join(out, B.DET_LABELS.format(split=split)), "w", encoding="utf-8") as f:
            json.dump(det[split], f)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump({"params": params, "counts": counts, "overlap_stems": overlap_stems}, f, indent=1)


def is_complete(root: str) -> bool:
    return os.path.exists(os.path.join(root, COMPLETE_MARKER))


def render_samples(count: int, size=(1280, 720), seed: int = 0) -> list[dict]:
    """`count` frames rendered in memory as decoded Samples (contracts.Sample: the image and each
    task's target at the frame's resolution, as the tasks' ``decode`` returns them), for code that
    wants realistic frames without files or an index (the benchmark's step cases). Frame i equals
    frame i of `write_synthetic` with the same seed, before JPEG; every frame carries every task."""
    width, height = int(size[0]), int(size[1])
    noise = _NoiseBank(seed, width, height)
    samples = []
    for index in range(count):
        scene_rng, lane_rng = frame_rngs(seed, index)
        frame = render_frame(scene_rng, width, height, noise, lane_rng)
        boxes, labels, ignore, ignore_labels = [], [], [], []
        for label in frame.labels:
            cls, ignored = B.det_category_to_index(label["category"])
            b = label["box2d"]
            (ignore if ignored else boxes).append([b["x1"], b["y1"], b["x2"], b["y2"]])
            (ignore_labels if ignored else labels).append(cls)
        det = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.asarray(labels, np.int64),
               "ignore_boxes": np.asarray(ignore, np.float32).reshape(-1, 4),
               "ignore_labels": np.asarray(ignore_labels, np.int64)}
        masks = {"sem": frame.sem, "drv": frame.drv, "lane": frame.lane}
        samples.append({"image": np.asarray(frame.image, np.uint8),
                        "targets": {"det": det, **{k: np.asarray(m, np.uint8) for k, m in masks.items()}}})
    return samples
