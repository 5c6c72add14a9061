"""``glyphs``: an offline, effectively unlimited 52-class image dataset of Latin letters.

The letters are drawn from the TrueType fonts that matplotlib ships (``mpl-data/fonts/ttf``: DejaVu
Sans/Serif/Mono with their bold and oblique cuts, STIX, Computer Modern), so the dataset needs no
download. It serves as an upstream task on which to pretrain a small ViT, which the continual-learning
runs then adapt.

Design:

* **Classes.** Ids 0-25 are ``A``-``Z`` and 26-51 are ``a``-``z`` (:data:`CLASSES`, the head order).
* **Fonts** (:mod:`avl_peft.cl.scenarios.glyph_fonts`): matplotlib's bundled fonts (the default pool, offline
  everywhere) or also the system's (``fonts="system"``, via fontconfig); only fonts with all 52 letters.
* **Train/test split by font family.** :func:`split_fonts` holds out whole families (seeded): no cut of a
  held-out design (its bold, its italic) is trained on, so test accuracy measures unseen type designs.
* **Image format** (MNIST-like). ``(1, H, W)`` float in ``[0, 1]``, white glyph on black. Each font is
  scaled so that its *letter box* (top of the tallest letter to the bottom of the deepest descender,
  or the widest letter if wider) spans about 26 px of 32; each glyph is centred horizontally on its own
  ink and vertically by the font's letter box. Scaling per font rather than per glyph keeps case pairs
  that differ mainly in size (``c``/``C``, ``o``/``O``, ``s``/``S``, ``x``/``X``...) apart: a lowercase
  ``x`` stays x-height tall and sits on the baseline.
* **Jitter.** Every sample gets a random affine map (rotation, scale, aspect, shear, translation), a
  stroke width change, blur, ink contrast and additive noise. Its parameters come from the sample's own
  generator ``numpy.random.default_rng((seed, split_id, index))``, so any item is reproducible on its
  own: ``dataset[i]``, a DataLoader with workers and :meth:`GlyphDataset.as_tensors` give the same
  pixels.
* **Two layout conventions.** Other letter datasets scale *each glyph* so that its ink box fills the
  canvas (a lowercase ``x`` as large as an ``X``). With ``fill_share > 0`` that share of the samples is
  laid out so: the glyph's ink box, centred, spans a random 72-100 % of the canvas (longer side), shifted
  within the margin left, so that which layout a user renders with matters less (measured, not
  removed: ``benchmarks/README.md``); :func:`render_filled` renders that layout independently, for tests.
* **Speed.** Each font's 52 letters are rasterised once (FreeType via Pillow) at twice the output
  resolution, together with eroded and dilated copies for the stroke change, and kept in memory. A
  batch of samples is then a blend of two stroke levels, one ``grid_sample`` at 2x resolution, a 2x2
  average down-sampling (anti-aliasing), a separable blur and noise. Every step is element-wise or a
  fixed-order per-pixel sum, so batch size does not change a bit of the result. Several thousand
  images per second render on one core.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from avl_peft.errors import ConfigError, DataError
from avl_peft.validate import is_int, is_number

from .glyph_fonts import CLASSES, FONT_POOLS, check_seed, font_dir, glyph_fonts, split_fonts

__all__ = [
    "CLASSES",
    "FONT_POOLS",
    "GlyphDataset",
    "font_dir",
    "font_rasters",
    "glyph_fonts",
    "render_filled",
    "split_fonts",
]
SPLITS: dict[str, int] = {"train": 0, "test": 1}  # split name -> id mixed into each sample's seed

BOX_FRACTION = 26 / 32  # a font's letter box spans this fraction of the image side
SUPERSAMPLE = 2  # glyph rasters and the warp run at this multiple of the output resolution
_RENDER_CHUNK = 1024  # samples warped at once by as_tensors (bounds peak memory, ~30 MB at 32 px)
_TENSOR_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_TENSOR_CACHE_SIZE = 4


def _ink_box(img: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the non-zero pixels, bottom/right exclusive."""
    rows, cols = np.nonzero(img.any(axis=1))[0], np.nonzero(img.any(axis=0))[0]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _draw_letters(path: Path, size: float, canvas: int) -> list[np.ndarray]:
    """Each letter drawn with its baseline origin at (canvas/3, 2*canvas/3) of a canvas x canvas image."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(path), size=size)
    out = []
    for ch in CLASSES:
        img = Image.new("L", (canvas, canvas), 0)
        ImageDraw.Draw(img).text((canvas / 3, 2 * canvas / 3), ch, fill=255, font=font, anchor="ls")
        arr = np.asarray(img)
        if not arr.any():
            raise DataError(f"font '{path}' drew an empty glyph for '{ch}'; remove it from the font folder")
        out.append(arr)
    return out


@lru_cache(maxsize=64)
def font_rasters(path: str, res: int) -> torch.Tensor:
    """The 52 letters of one font as a ``(52, res, res)`` float tensor in [0, 1], laid out as the module
    docstring describes (letter box ``BOX_FRACTION * res``, centred). Cached per (font, resolution)."""
    path_ = Path(path)
    # Pass 1 at a reference size measures the font's letter box in pixels; pass 2 draws at the size
    # that makes that box BOX_FRACTION of the raster. Measuring ink, not font metrics, is robust to
    # fonts whose ascent/descent fields are off (the Computer Modern conversions).
    ref = 200.0
    boxes = [_ink_box(a) for a in _draw_letters(path_, ref, canvas=int(ref * 3))]
    extent = max(max(b[1] for b in boxes) - min(b[0] for b in boxes), max(b[3] - b[2] for b in boxes))
    size = ref * BOX_FRACTION * res / extent
    canvas = 3 * res
    letters = _draw_letters(path_, size, canvas=canvas)
    boxes = [_ink_box(a) for a in letters]
    top, bottom = min(b[0] for b in boxes), max(b[1] for b in boxes)
    dy = round(res / 2 - (top + bottom) / 2)  # same vertical shift for every letter: keeps the baseline
    out = np.zeros((len(CLASSES), res, res), dtype=np.float32)
    for k, (arr, (_, _, left, right)) in enumerate(zip(letters, boxes)):
        dx = round(res / 2 - (left + right) / 2)  # each letter centred on its own ink
        # source window [y0, y0 + res) x [x0, x0 + res) of the canvas lands on the raster
        y0, x0 = -dy, -dx
        ys, xs = max(0, y0), max(0, x0)
        ye, xe = min(canvas, y0 + res), min(canvas, x0 + res)
        out[k, ys - y0 : ye - y0, xs - x0 : xe - x0] = arr[ys:ye, xs:xe] / 255.0
    return torch.from_numpy(out)


def _stroke_bank(rasters: torch.Tensor) -> torch.Tensor:
    """``(52, R, R)`` -> ``(52, 4, R, R)``: eroded, as drawn, dilated once, dilated twice (3x3 steps).

    At the 2x raster resolution one step moves each edge by half an output pixel. Blending two
    adjacent levels gives a continuous stroke width; doing it on the cached rasters, before the warp,
    costs one lerp per sample instead of morphology on every warped image.
    """
    x = rasters.unsqueeze(1)
    dil = F.max_pool2d(x, 3, 1, 1)
    return torch.cat([-F.max_pool2d(-x, 3, 1, 1), x, dil, F.max_pool2d(dil, 3, 1, 1)], 1)


_LEVELS = 4  # stroke levels per glyph in the bank; level 1 is the glyph as drawn


@lru_cache(maxsize=4)
def _raster_bank(fonts: tuple[str, ...], res: int) -> torch.Tensor:
    """All stroke levels of all letters of ``fonts``: ``(len(fonts) * 52 * 4, 1, res, res)``,
    row ``(font * 52 + label) * 4 + level``."""
    return torch.cat([_stroke_bank(font_rasters(f, res)) for f in fonts]).reshape(-1, 1, res, res)


@lru_cache(maxsize=4)
def _glyph_boxes(fonts: tuple[str, ...], res: int) -> np.ndarray:
    """Ink box of each letter of ``fonts`` as drawn: ``(len(fonts) * 52, 4)`` rows ``(x0, x1, y0, y1)``,
    edges in the normalised coordinates of ``grid_sample`` (the raster spans -1..1)."""
    boxes = []
    for f in fonts:
        for glyph in font_rasters(f, res).numpy():
            top, bottom, left, right = _ink_box(glyph > 0.1)  # faint anti-aliasing is not the box
            boxes.append([2 * left / res - 1, 2 * right / res - 1, 2 * top / res - 1, 2 * bottom / res - 1])
    return np.array(boxes, dtype=np.float64)


N_PARAMS = 15  # theta (6), stroke level and blend (2), blur taps (5), ink, noise std
FILL_MIN = 0.72  # a filled glyph's longer side spans FILL_MIN..1 of the canvas
SCALE_JITTER = 0.10  # typographic layout: log-scale range per unit jitter (the fill layout adds the wide scales)
SHIFT_PX = 1.5  # typographic layout: shift range in output pixels per unit jitter


def _sample_params(
    rng: np.random.Generator, jitter: float, img_size: int, box: np.ndarray, fill_share: float
) -> tuple[np.ndarray, np.ndarray]:
    """One sample's warp and degradation parameters and its noise field.

    ``box`` is the glyph's ink box in the raster, ``(x0, x1, y0, y1)`` in normalised coordinates; it places
    the glyph when the sample is drawn in the fill convention (probability ``fill_share``). The draw order
    is fixed, and everything derived from the draws is computed here in float64 scalar Python (no
    vectorised transcendental functions whose rounding could depend on batch size), so the batched
    renderer only ever does exactly rounded element-wise arithmetic on these numbers.
    """
    u = rng.random(12) * 2 - 1  # twelve uniforms in [-1, 1)
    j = jitter
    rot = math.radians(12) * j * u[0]
    aspect = math.exp(0.10 * j * u[2])  # width / height
    shear = 0.22 * j * u[3]  # horizontal
    if (u[10] + 1) / 2 < fill_share:  # fill convention: the glyph's own ink box spans `fill` of the canvas
        fill = FILL_MIN + (1 - FILL_MIN) * (u[11] + 1) / 2
        scale = 2 * fill / max(box[1] - box[0], box[3] - box[2])
        cx, cy = (box[0] + box[1]) / 2, (box[2] + box[3]) / 2
        tx, ty = (1 - fill) * u[4], (1 - fill) * u[5]  # anywhere in the margin left (normalised units)
    else:  # typographic: the font's letter box at ~26/32, the glyph at its size within it
        scale = math.exp(SCALE_JITTER * j * u[1]) * (1 - 0.06 * j)  # centred a bit below 1 so jitter rarely clips
        cx = cy = 0.0
        tx, ty = (SHIFT_PX * j * u[4]) * 2 / img_size, (SHIFT_PX * j * u[5]) * 2 / img_size  # normalised units
    stroke = j * (0.55 + 1.05 * u[6])  # [-0.5, 1.6] x jitter: thinner .. bolder, in 3x3 steps at 2x res
    sigma = max(0.45 * j * (1 + u[7]), 1e-3)  # blur, output pixels, [0, 0.9]
    ink = 1 - 0.15 * j * (1 + u[8])  # glyph brightness, [0.7, 1]
    noise_std = 0.03 * j * (1 + u[9])  # [0, 0.06]

    # Forward map raster -> image: y = A (x - c) + t, A = Rotation @ Shear @ diag(sx, sy), in normalised
    # coordinates; the sampler needs the inverse x = c + A^-1 (y - t).
    sx, sy = scale * math.sqrt(aspect), scale / math.sqrt(aspect)
    c, s = math.cos(rot), math.sin(rot)
    a00, a01, a10, a11 = c * sx, (c * shear - s) * sy, s * sx, (s * shear + c) * sy
    det = a00 * a11 - a01 * a10
    i00, i01, i10, i11 = a11 / det, -a01 / det, -a10 / det, a00 / det
    theta = [i00, i01, cx - (i00 * tx + i01 * ty), i10, i11, cy - (i10 * tx + i11 * ty)]

    level = min(max(stroke + 1, 0.0), _LEVELS - 1.0)
    lo = min(math.floor(level), _LEVELS - 2)
    taps = [math.exp(-(d * d) / (2 * sigma * sigma)) for d in (-2, -1, 0, 1, 2)]
    taps = [t / sum(taps) for t in taps]
    params = np.array([*theta, lo, level - lo, *taps, ink, noise_std])
    noise = rng.standard_normal((img_size, img_size), dtype=np.float32)
    return params, noise


def _shift(x: torch.Tensor, d: int, dim: int) -> torch.Tensor:
    """x shifted by d pixels along dim (-1 or -2), zeros entering; no wrap-around."""
    if d == 0:
        return x
    pad = [0, 0, 0, 0]
    pad[(0 if dim == -1 else 2) + (0 if d > 0 else 1)] = abs(d)
    return F.pad(x, pad).narrow(dim, 0 if d > 0 else abs(d), x.shape[dim])


def _render(bank: torch.Tensor, rows: np.ndarray, params: np.ndarray, noise: np.ndarray) -> torch.Tensor:
    """Images ``(n, 1, H, W)`` of glyph ``rows`` of the raster ``bank`` under per-sample ``params``.

    Only element-wise arithmetic (each operation exactly rounded), bilinear sampling and fixed-order
    sums per pixel: rendering a sample alone gives bit for bit what it gets inside any batch.
    """
    n, img_size, res = len(rows), noise.shape[-1], bank.shape[-1]
    p = torch.from_numpy(params).float().view(n, N_PARAMS, 1, 1, 1).unbind(1)
    theta, frac, taps, ink, noise_std = p[:6], p[7], p[8:13], p[13], p[14]

    base = torch.from_numpy(rows * _LEVELS + params[:, 6].astype(np.int64))  # lower stroke level of each sample
    lower, upper = bank[base], bank[base + 1]
    src = lower + frac * (upper - lower)  # continuous stroke width between two levels

    # Sampling grid written element-wise: affine_grid is a batched matmul whose rounding may depend
    # on the batch size.
    c = (torch.arange(res, dtype=torch.float32) * 2 + 1) / res - 1  # pixel centres, align_corners=False
    gx, gy = c.view(1, 1, res), c.view(1, res, 1)
    th = [t.view(n, 1, 1) for t in theta]
    grid = torch.stack([th[0] * gx + th[1] * gy + th[2], th[3] * gx + th[4] * gy + th[5]], -1)
    x = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = F.avg_pool2d(x, res // img_size)  # area down-sampling: anti-aliased output

    # Separable Gaussian blur with per-sample taps, as a weighted sum of shifted copies.
    for dim in (-1, -2):
        acc = taps[0] * _shift(x, -2, dim)
        for w, d in zip(taps[1:], (-1, 0, 1, 2)):
            acc = acc + w * _shift(x, d, dim)
        x = acc
    x = x * ink + torch.from_numpy(noise).unsqueeze(1) * noise_std
    return x.clamp(0, 1)


class GlyphDataset(Dataset):
    """``52 * n_per_class`` letter images of one split; item ``i`` is ``(image, label)`` with image a
    ``(1, img_size, img_size)`` float tensor in [0, 1] and label ``i % 52`` (see :data:`CLASSES`).

    Item ``i`` uses font ``fonts[(i // 52) % len(fonts)]`` (fonts cycle, so each is equally used) and
    its own generator ``default_rng((seed, split_id, i))``. ``jitter`` scales every random
    perturbation (0 gives clean centred glyphs). ``seed`` also picks the held-out font families
    (:func:`split_fonts`, from the font pool ``fonts``), so the train and test sets of one seed never share
    a family. ``fill_share`` is the share of samples laid out in the fill convention (module docstring).
    """

    def __init__(
        self,
        split: str,
        n_per_class: int,
        seed: int = 0,
        img_size: int = 32,
        *,
        test_fraction: float = 0.25,
        jitter: float = 1.0,
        fill_share: float = 0.0,
        fonts: str = "matplotlib",
    ):
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not is_int(n_per_class) or n_per_class < 1:
            raise ConfigError(f"n_per_class must be a positive integer, got {n_per_class!r}")
        if not is_int(img_size) or not 8 <= img_size <= 512:
            raise ConfigError(f"img_size must be an integer from 8 to 512, got {img_size!r}")
        if not is_number(jitter) or not 0 <= jitter <= 2:
            raise ConfigError(f"jitter must be a number from 0 (none) to 2 (double), got {jitter!r}")
        if not is_number(fill_share) or not 0 <= fill_share <= 1:
            raise ConfigError(f"fill_share must be a number from 0 to 1, got {fill_share!r}")
        self.split, self.n_per_class, self.seed, self.img_size = split, n_per_class, check_seed(seed), img_size
        self.test_fraction, self.jitter, self.fill_share = float(test_fraction), float(jitter), float(fill_share)
        self.font_pool = fonts
        train, test = split_fonts(self.seed, test_fraction, fonts)
        self.fonts: list[Path] = train if split == "train" else test
        self.classes: list[str] = list(CLASSES)
        self._split_id = SPLITS[split]
        self._rasters: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(CLASSES) * self.n_per_class

    def _bank(self) -> torch.Tensor:
        # built lazily (and dropped when pickled) so DataLoader workers rebuild it instead of copying it
        if self._rasters is None:
            self._rasters = _raster_bank(tuple(str(f) for f in self.fonts), SUPERSAMPLE * self.img_size)
        return self._rasters

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_rasters"] = None  # DataLoader workers rebuild the rasters instead of copying them
        return state

    def _item_rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = idx % len(CLASSES)
        fonts = (idx // len(CLASSES)) % len(self.fonts)
        return fonts * len(CLASSES) + labels, labels

    def render(self, indices: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(n, 1, H, W)`` and labels ``(n,)`` of the given item indices, rendered in one batch."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"glyph item index out of range 0..{len(self) - 1}")
        rows, labels = self._item_rows(idx)
        boxes = _glyph_boxes(tuple(str(f) for f in self.fonts), SUPERSAMPLE * self.img_size)
        drawn = [
            _sample_params(
                np.random.default_rng((self.seed, self._split_id, int(i))),
                self.jitter,
                self.img_size,
                boxes[row],
                self.fill_share,
            )
            for i, row in zip(idx, rows)
        ]
        if not drawn:
            return torch.zeros(0, 1, self.img_size, self.img_size), torch.zeros(0, dtype=torch.int64)
        params, noise = np.stack([d[0] for d in drawn]), np.stack([d[1] for d in drawn])
        return _render(self._bank(), rows, params, noise), torch.from_numpy(labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += len(self)
        images, labels = self.render([index])
        return images[0], int(labels[0])

    def _key(self) -> tuple:
        return (
            self.split,
            self.n_per_class,
            self.seed,
            self.img_size,
            self.test_fraction,
            self.jitter,
            self.fill_share,
            self.font_pool,
        )

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as ``(images (N, 1, H, W), labels (N,))``, rendered in batches.

        Results are cached in memory by the dataset's arguments (the last few), so building the same
        split twice is free; treat the returned tensors as read-only.
        """
        key = self._key()
        if key in _TENSOR_CACHE:
            _TENSOR_CACHE.move_to_end(key)
            return _TENSOR_CACHE[key]
        parts = [
            self.render(np.arange(s, min(s + _RENDER_CHUNK, len(self)))) for s in range(0, len(self), _RENDER_CHUNK)
        ]
        out = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        _TENSOR_CACHE[key] = out
        while len(_TENSOR_CACHE) > _TENSOR_CACHE_SIZE:
            _TENSOR_CACHE.popitem(last=False)
        return out


def render_filled(fonts: list[Path], img_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The 52 letters of each font in the *fill* convention, clean: ``(len(fonts) * 52, 1, H, W)`` images
    (font-major, class order :data:`CLASSES`) and their labels.

    Each glyph is drawn large, cropped to its ink box and resized (area filter, aspect kept) so that its
    longer side spans the whole canvas, then centred: how many other letter datasets lay glyphs out, and
    independent of this module's warp, so it tests whether a model depends on the typographic layout.
    """
    from PIL import Image

    big = 4 * img_size  # drawn at 4x, then area-averaged down: anti-aliased
    images = []
    for path in fonts:
        for arr in _draw_letters(Path(path), big, canvas=3 * big):
            top, bottom, left, right = _ink_box(arr)
            crop = Image.fromarray(arr[top:bottom, left:right].astype(np.float32))  # float: no faint edge rounds to 0
            k = img_size / max(bottom - top, right - left)
            w, h = max(1, round((right - left) * k)), max(1, round((bottom - top) * k))
            out = Image.new("F", (img_size, img_size), 0.0)
            out.paste(crop.resize((w, h), Image.Resampling.BOX), ((img_size - w) // 2, (img_size - h) // 2))
            images.append(np.asarray(out, dtype=np.float32) / 255.0)
    labels = torch.arange(len(CLASSES)).repeat(len(fonts))
    return torch.from_numpy(np.stack(images)).unsqueeze(1), labels
