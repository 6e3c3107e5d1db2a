"""Drawing one synthetic specimen with PIL: the species' attributes plus per-image nuisance.

Objects are drawn in "unit" coordinates (about [-1, 1], centred) on a canvas twice the output size,
then rotated, flipped, composited on a textured background, lit, down-sampled and noised. Sibling
attributes are drawn large enough (≥ ~1.5 px at 64 px) to be visible to a classifier looking closely.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from near_ray.sim.taxonomy import INK, PALETTE, SIZES

RGB = tuple[int, int, int]
NAMED = INK
BACKGROUNDS: dict[str, RGB] = {
    "green": (95, 140, 85), "blue": (120, 160, 205), "grey": (150, 150, 150), "brown": (140, 115, 85),
    "sand": (205, 190, 150), "white": (225, 225, 220), "teal": (90, 150, 145),
}
COLOURS = {c.name.lower(): c.rgb for c in PALETTE}


@dataclass
class Pen:
    """Maps unit coordinates onto the canvas and draws filled shapes."""

    draw: ImageDraw.ImageDraw
    cx: float
    cy: float
    s: float  # pixels per unit

    def pt(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + x * self.s, self.cy + y * self.s)

    def ellipse(self, x: float, y: float, rx: float, ry: float, fill: RGB, angle: float = 0.0) -> None:
        pts = [(x + rx * math.cos(t) * math.cos(angle) - ry * math.sin(t) * math.sin(angle),
                y + rx * math.cos(t) * math.sin(angle) + ry * math.sin(t) * math.cos(angle))
               for t in np.linspace(0, 2 * math.pi, 20, endpoint=False)]
        self.poly(pts, fill)

    def poly(self, pts: list[tuple[float, float]], fill: RGB) -> None:
        self.draw.polygon([self.pt(x, y) for x, y in pts], fill=fill)

    def line(self, pts: list[tuple[float, float]], fill: RGB, width: float) -> None:
        self.draw.line([self.pt(x, y) for x, y in pts], fill=fill, width=max(1, round(width * self.s)))

    def dot(self, x: float, y: float, r: float, fill: RGB) -> None:
        self.ellipse(x, y, r, r, fill)


def shade(c: RGB, f: float) -> RGB:
    return tuple(int(max(0, min(255, v * f))) for v in c)  # type: ignore[return-value]


def jitter(c: RGB, rng: np.random.Generator, amount: int = 10) -> RGB:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in c)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ birds
def draw_bird(p: Pen, a: dict[str, Any], body: RGB) -> None:
    bw = 0.5
    bh = bw / a["body_aspect"] * 1.3
    tl, kind = a["tail_len"], a["shape"]
    x0, x1 = -bw * 0.75, -bw * 0.75 - tl
    th = {"pointed": 0.04, "forked": 0.2, "fan": 0.26, "square": 0.13}[kind]
    rh = 0.11
    if kind == "forked":
        tail = [(x0, -rh), (x1, -th), (x1 + tl * 0.35, 0.0), (x1, th), (x0, rh)]
    else:
        tail = [(x0, -rh), (x1, -th), (x1, th), (x0, rh)]
    p.poly(tail, shade(body, 0.8))
    _tail_pattern(p, a["tail_pattern"], x0, x1, rh, th)
    p.line([(-0.15, bh * 0.8), (-0.2, bh + 0.25)], NAMED["dark"], 0.04)
    p.line([(0.1, bh * 0.8), (0.08, bh + 0.25)], NAMED["dark"], 0.04)
    p.ellipse(0, 0, bw, bh, body)
    breast = a["breast"]
    if breast == "pale":
        p.ellipse(0.2, bh * 0.35, bw * 0.55, bh * 0.55, NAMED["pale"])
    elif breast == "streaked":
        for dx in (0.05, 0.2, 0.35):
            p.line([(dx, bh * 0.1), (dx - 0.05, bh * 0.75)], NAMED["dark"], 0.05)
    elif breast == "spotted":
        for dx, dy in ((0.1, 0.3), (0.3, 0.25), (0.2, 0.6), (0.38, 0.55)):
            p.dot(dx, bh * dy, 0.045, NAMED["dark"])
    p.ellipse(-0.1, -bh * 0.15, bw * 0.6, bh * 0.55, shade(body, 0.65), angle=-0.15)
    if a["wing_bar"] != "none":
        p.line([(-0.1, -bh * 0.65), (-0.02, bh * 0.35)], NAMED[a["wing_bar"]], 0.09)
    hr = a["head_size"]
    hx, hy = bw * 0.85, -bh * 0.75
    p.dot(hx, hy, hr, body)
    if a["crown"] != "plain":
        p.poly([(hx - hr * 0.9, hy - hr * 0.3), (hx - hr * 0.4, hy - hr), (hx + hr * 0.5, hy - hr * 0.95),
                (hx + hr * 0.9, hy - hr * 0.35)], NAMED[a["crown"]])
    bl = a["beak_len"]
    p.poly([(hx + hr * 0.8, hy - 0.06), (hx + hr * 0.8 + bl, hy + 0.02), (hx + hr * 0.8, hy + 0.08)], NAMED["dark"])
    p.dot(hx + hr * 0.35, hy - hr * 0.1, 0.05, NAMED["black"])


def _tail_pattern(p: Pen, pattern: str, x0: float, x1: float, rh: float, th: float) -> None:
    def at(t: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * t, rh + (th - rh) * t

    if pattern == "barred":
        for t in (0.3, 0.55, 0.8):
            x, h = at(t)
            p.line([(x, -h), (x, h)], NAMED["dark"], 0.06)
    elif pattern == "spotted":
        for t in (0.35, 0.7):
            x, h = at(t)
            p.dot(x, -h * 0.45, 0.05, NAMED["white"])
            p.dot(x, h * 0.45, 0.05, NAMED["white"])
    elif pattern == "white-tipped":
        x, h = at(0.72)
        p.poly([(x, -h), (x1, -th), (x1, th), (x, h)], NAMED["white"])


# ------------------------------------------------------------------------------------------ flowers
def draw_flower(p: Pen, a: dict[str, Any], petal: RGB) -> None:
    n = int(a["shape"])
    pl, pw, dr = a["petal_len"], a["petal_width"] * (0.7 if n >= 12 else 1.0), a["disk_radius"]
    if a["stem_len"] > 0.05:
        p.line([(0, 0), (0.05, 0.4 + a["stem_len"])], NAMED["green"], 0.07)
        p.ellipse(0.2, 0.35 + a["stem_len"] * 0.6, 0.2, 0.07, NAMED["green"], angle=-0.5)
    for k in range(n):
        ang = 2 * math.pi * k / n
        c, s = math.cos(ang), math.sin(ang)
        mid = dr + pl / 2
        p.ellipse(c * mid, s * mid, pl / 2, pw, petal, angle=ang)
        if a["petal_tip"] != "plain":
            tip = dr + pl * 0.85
            p.ellipse(c * tip, s * tip, pl * 0.15, pw * 0.8, NAMED[a["petal_tip"]], angle=ang)
        if a["petal_stripe"] != "none":
            p.line([(c * dr, s * dr), (c * (dr + pl * 0.7), s * (dr + pl * 0.7))], NAMED[a["petal_stripe"]], 0.05)
        if a["petal_spots"] != "none":
            sp = dr + pl * 0.45
            p.dot(c * sp - s * pw * 0.4, s * sp + c * pw * 0.4, 0.045, NAMED[a["petal_spots"]])
    p.dot(0, 0, dr, NAMED[a["disk"]])


# ------------------------------------------------------------------------------------------ mushrooms
def draw_mushroom(p: Pen, a: dict[str, Any], cap: RGB) -> None:
    cw, ch, sw, sl = a["cap_width"] / 2 + 0.1, a["cap_height"], a["stem_width"] / 2 + 0.04, a["stem_len"]
    top = -0.3
    stem = NAMED[a["stem_colour"]] if a["stem_colour"] != "white" else (235, 230, 215)
    p.poly([(-sw, top), (sw, top), (sw * 1.2, top + sl + 0.1), (-sw * 1.2, top + sl + 0.1)], stem)
    if a["stem_ring"] != "none":
        p.poly([(-sw * 1.5, top + sl * 0.25), (sw * 1.5, top + sl * 0.25), (sw * 1.3, top + sl * 0.25 + 0.09),
                (-sw * 1.3, top + sl * 0.25 + 0.09)], NAMED[a["stem_ring"]])
    kind = a["shape"]
    rim: list[tuple[float, float]]
    if kind == "conical":
        outline = [(-cw, top), (-cw * 0.3, top - ch * 0.8), (0, top - ch * 1.2), (cw * 0.3, top - ch * 0.8), (cw, top)]
    elif kind == "flat":
        outline = [(-cw, top), (-cw * 0.9, top - ch * 0.8), (cw * 0.9, top - ch * 0.8), (cw, top)]
    elif kind == "bell":
        outline = [(-cw * 0.75, top), (-cw * 0.8, top - ch * 0.7), (-cw * 0.4, top - ch * 1.1),
                   (cw * 0.4, top - ch * 1.1), (cw * 0.8, top - ch * 0.7), (cw * 0.75, top)]
    else:
        outline = [(cw * math.cos(t), top - ch * math.sin(t)) for t in np.linspace(math.pi, 0, 14)]
    p.poly([*outline, (outline[-1][0], top + 0.06), (outline[0][0], top + 0.06)], cap)
    p.poly([(outline[0][0] * 0.9, top), (outline[-1][0] * 0.9, top), (outline[-1][0] * 0.6, top + 0.07),
            (outline[0][0] * 0.6, top + 0.07)], shade(cap, 0.6))  # gills
    if a["cap_rim"] != "none":
        rim = [(outline[0][0], top - 0.01), (outline[-1][0], top - 0.01), (outline[-1][0], top + 0.06),
               (outline[0][0], top + 0.06)]
        p.poly(rim, NAMED[a["cap_rim"]])
    if a["cap_spots"] != "none":
        w = abs(outline[-1][0])
        for fx, fy in ((-0.45, 0.35), (0.0, 0.55), (0.45, 0.35), (-0.2, 0.2), (0.25, 0.18)):
            p.dot(w * fx, top - ch * fy, 0.055, NAMED[a["cap_spots"]])


# ------------------------------------------------------------------------------------------ butterflies
def draw_butterfly(p: Pen, a: dict[str, Any], wing: RGB) -> None:
    fl, fw, hl, hw, kind = a["fore_len"], a["fore_width"], a["hind_len"], a["hind_width"], a["shape"]
    for side in (-1, 1):
        fa = side * (0.55 if kind == "pointed" else 0.75)
        fx, fy = side * math.sin(abs(fa)) * fl * 0.55, -math.cos(abs(fa)) * fl * 0.55
        p.ellipse(fx, fy, fl * 0.55, fw, wing if a["wing_border"] == "none" else NAMED[a["wing_border"]],
                  angle=fa - math.pi / 2 * side)
        p.ellipse(fx, fy, fl * 0.55 - 0.06, fw - 0.06, wing, angle=fa - math.pi / 2 * side)
        if a["wing_tip"] != "plain":
            tx, ty = side * math.sin(abs(fa)) * fl * 0.95, -math.cos(abs(fa)) * fl * 0.95
            p.dot(tx, ty, 0.11, NAMED[a["wing_tip"]])
        if a["band"] != "none":
            p.line([(side * 0.15, fy - fw * 0.3), (fx + side * 0.05, fy + fw * 0.5)], NAMED[a["band"]], 0.07)
        hx, hy = side * hw * 0.8, hl * 0.6
        if kind == "tailed":
            p.line([(hx, hy), (hx + side * 0.1, hy + hl * 0.9)], shade(wing, 0.6), 0.06)
        p.ellipse(hx, hy, hw if a["wing_border"] == "none" else hw, hl * 0.6,
                  wing if a["wing_border"] == "none" else NAMED[a["wing_border"]])
        p.ellipse(hx, hy, hw - 0.05, hl * 0.6 - 0.05, shade(wing, 0.9))
        if kind == "scalloped":
            for t in (0.3, 1.1, 1.9):
                p.dot(hx + side * hw * 0.9 * math.cos(t), hy + hl * 0.55 * math.sin(t), 0.05, shade(wing, 0.5))
        if a["eyespots"] != "none":
            p.dot(hx + side * 0.05, hy + 0.05, 0.09, NAMED["black"] if a["eyespots"] != "black" else NAMED["pale"])
            p.dot(hx + side * 0.05, hy + 0.05, 0.06, NAMED[a["eyespots"]])
    p.ellipse(0, 0.1, 0.06, 0.5, NAMED["dark"])
    p.line([(0, -0.35), (-0.15, -0.65)], NAMED["dark"], 0.025)
    p.line([(0, -0.35), (0.15, -0.65)], NAMED["dark"], 0.025)


DRAWERS: dict[str, Callable[[Pen, dict[str, Any], RGB], None]] = {
    "birds": draw_bird, "flowers": draw_flower, "mushrooms": draw_mushroom, "butterflies": draw_butterfly,
}


# ------------------------------------------------------------------------------------------ one image
def _background(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    base = np.array(jitter(BACKGROUNDS[name], rng, 15), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ang = rng.uniform(0, 2 * math.pi)
    grad = (np.cos(ang) * xx + np.sin(ang) * yy - 0.5) * rng.uniform(10, 40)
    texture = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(3, 8))):  # soft blobs: leaves, pebbles, clouds
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.25)
        texture += rng.uniform(-25, 25) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    img = base[None, None, :] + (grad + texture)[..., None]
    return img, name


def render(domain: str, attrs: dict[str, Any], image_size: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """(image, background name) for one specimen with these attributes, drawn with per-image nuisance."""
    c = image_size * 2
    layer = Image.new("RGBA", (c, c), (0, 0, 0, 0))
    scale = SIZES[attrs["size"]] * rng.uniform(0.92, 1.08)
    pen = Pen(ImageDraw.Draw(layer), c / 2, c / 2, c * 0.36 * scale)
    DRAWERS[domain](pen, attrs, jitter(COLOURS[attrs["colour"]], rng, 12))
    layer = layer.rotate(float(rng.uniform(-25, 25)), resample=Image.BICUBIC,
                         translate=(float(rng.uniform(-0.08, 0.08) * c), float(rng.uniform(-0.08, 0.08) * c)))
    if rng.random() < 0.5:
        layer = layer.transpose(Image.FLIP_LEFT_RIGHT)
    bg, bg_name = _background(c, rng)
    rgba = np.asarray(layer, dtype=np.float32)
    alpha = rgba[..., 3:4] / 255.0
    img = bg * (1 - alpha) + rgba[..., :3] * alpha
    img = img * rng.uniform(0.8, 1.15) + rng.uniform(-12, 12)  # lighting: gain and offset
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((image_size, image_size), Image.LANCZOS)
    arr = np.asarray(small, dtype=np.float32) + rng.normal(0, rng.uniform(0, 6), (image_size, image_size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), bg_name
