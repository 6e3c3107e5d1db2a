"""How an image looks to the simulated annotator: a fixed, hand-made pixel descriptor (no learned model).

The appearance-following profiles (appearance.py) decide which images are hard and which class a
wrong answer names from this descriptor, never from the CLIP under test, so the simulator's errors do
not follow the features the method is built on. It is computed from decoded pixels alone, so it works
for any image collection with a truth table, synthetic or real:

- the object, taken as the pixels whose colour is far from the border's (the background's): mean and
  spread of R, G, B, a coarse 3x3x3 colour histogram, its area and its extent across and down;
- the scene: the mean colour of the border;
- layout: a 4x4 grid of mean brightness;
- shape and texture: an 8-orientation histogram of gradient energy in each quarter of the image,
  and the share of strong edges.

Every dimension is standardised over the collection and each block weighted (BLOCKS), whatever its length.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

SIDE = 32  # pixels per side the descriptor looks at: coarse enough to ignore re-encoding noise
CENTRE = slice(SIDE // 4, SIDE - SIDE // 4)
BORDER = 4
FOREGROUND = 0.3  # summed |R, G, B| difference (0-1 scale) from the background that marks an object pixel
MIN_OBJECT = 8  # pixels
ORIENTATIONS = 8
# Block name -> (length, weight), in the order describe() concatenates them. The object (the centre's
# colours, the contours) weighs more than the scene around it (background colour, brightness layout).
BLOCKS = {"object_colour": (6, 2.0), "object_histogram": (27, 2.0), "object_shape": (3, 1.0),
          "border_colour": (3, 0.5), "layout": (16, 0.5), "gradients": (4 * ORIENTATIONS, 1.0), "edges": (1, 0.5)}


def describe(data: bytes) -> np.ndarray:
    """The raw descriptor of one encoded image (float32, the BLOCKS' lengths summed)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = np.asarray(img.convert("RGB").resize((SIDE, SIDE), Image.BOX), dtype=np.float32) / 255.0
    ring = np.ones((SIDE, SIDE), bool)
    ring[BORDER:-BORDER, BORDER:-BORDER] = False
    border = rgb[ring].mean(axis=0)
    # The object: pixels far from the border's median colour (the background); the centre if none stand out.
    mask = np.abs(rgb - np.median(rgb[ring], axis=0)).sum(axis=2) > FOREGROUND
    if mask.sum() < MIN_OBJECT:
        mask = np.zeros((SIDE, SIDE), bool)
        mask[CENTRE, CENTRE] = True
    obj = rgb[mask]
    colour = np.concatenate([obj.mean(axis=0), obj.std(axis=0)])
    bins = np.minimum((obj * 3).astype(int), 2)
    hist = np.bincount(bins[:, 0] * 9 + bins[:, 1] * 3 + bins[:, 2], minlength=27) / len(obj)
    ys, xs = np.nonzero(mask)
    shape = np.array([mask.mean(), xs.std() / SIDE, ys.std() / SIDE])
    grey = rgb.mean(axis=2)
    layout = grey.reshape(4, SIDE // 4, 4, SIDE // 4).mean(axis=(1, 3)).reshape(-1)
    gy, gx = np.gradient(grey)
    magnitude = np.hypot(gx, gy)
    # Orientation modulo pi: a dark-on-light edge and a light-on-dark one are the same contour.
    orient = np.minimum((np.mod(np.arctan2(gy, gx), np.pi) / np.pi * ORIENTATIONS).astype(int), ORIENTATIONS - 1)
    half = SIDE // 2
    cells = []
    for rows in (slice(0, half), slice(half, SIDE)):
        for cols in (slice(0, half), slice(half, SIDE)):
            h = np.bincount(orient[rows, cols].reshape(-1), weights=magnitude[rows, cols].reshape(-1),
                            minlength=ORIENTATIONS)
            cells.append(h / (h.sum() + 1e-6))
    edges = np.array([(magnitude > 0.08).mean()])
    return np.concatenate([colour, hist, shape, border, layout, *cells, edges]).astype(np.float32)


def standardise(raw: np.ndarray) -> np.ndarray:
    """Descriptors of a collection (one per row) as comparable vectors: every dimension z-scored over
    the collection, every block scaled by 1/sqrt(its length) so a long block does not outweigh a short one."""
    mean, std = raw.mean(axis=0), raw.std(axis=0)
    z = (raw - mean) / np.where(std > 1e-6, std, 1.0)
    weights = np.concatenate([np.full(n, w / np.sqrt(n)) for n, w in BLOCKS.values()])
    return (z * weights).astype(np.float32)
