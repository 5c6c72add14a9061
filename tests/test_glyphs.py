"""The offline glyphs dataset: class order, image format, font-family split, layout conventions, reproducibility."""

import string

import numpy as np
import pytest
import torch
from fontTools.ttLib import TTFont

from avl_peft.cl.scenarios import glyph_fonts as fonts_module
from avl_peft.cl.scenarios import glyphs
from avl_peft.cl.scenarios.glyph_fonts import font_families, font_family
from avl_peft.cl.scenarios.glyphs import CLASSES, GlyphDataset, glyph_fonts, render_filled, split_fonts
from avl_peft.errors import ConfigError


def test_class_order_is_upper_then_lower():
    assert list(CLASSES) == list(string.ascii_uppercase) + list(string.ascii_lowercase)
    assert CLASSES[0] == "A" and CLASSES[25] == "Z" and CLASSES[26] == "a" and CLASSES[51] == "z"
    ds = GlyphDataset("train", 2, seed=0)
    assert ds.classes == list(CLASSES)
    assert len(ds) == 104
    assert [ds[i][1] for i in (0, 25, 26, 51, 52, 103)] == [0, 25, 26, 51, 0, 51]


def test_image_format_white_on_black_centred():
    ds = GlyphDataset("train", 3, seed=0)
    x, y = ds[5]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    images, labels = ds.as_tensors()
    assert images.shape == (156, 1, 32, 32) and labels.dtype == torch.int64
    assert images.min() >= 0 and images.max() <= 1
    border = torch.cat([images[..., :2, :].flatten(1), images[..., -2:, :].flatten(1)], 1)
    centre = images[..., 8:24, 8:24]
    assert border.mean() < 0.05  # black background
    assert centre.mean() > 0.15  # white glyph in the middle
    assert images.amax(dim=(1, 2, 3)).min() > 0.5  # every image has ink


def test_clean_glyph_box_is_about_26_px_and_centred():
    ds = GlyphDataset("test", len(glyph_fonts()), seed=0, jitter=0)
    images, labels = ds.as_tensors()
    for f in range(len(ds.fonts)):
        ink = images[f * 52 : (f + 1) * 52, 0] > 0.3  # the 52 letters of one font
        rows = torch.nonzero(ink.any(0).any(1)).flatten()
        cols = torch.nonzero(ink.any(0).any(0)).flatten()
        height = int(rows[-1] - rows[0] + 1)  # tallest ascender to deepest descender
        widths = [int(c[-1] - c[0] + 1) for c in (torch.nonzero(g.any(0)).flatten() for g in ink)]
        box = max(height, max(widths))  # the letter box: height, or the widest letter if wider
        assert 24 <= box <= 28, (ds.fonts[f].name, height, max(widths))
        assert abs((rows[0] + rows[-1]) / 2 - 15.5) <= 1.5
        assert abs((cols[0] + cols[-1]) / 2 - 15.5) <= 1.5
    # case is kept by size: a clean lowercase 'x' is shorter than its capital 'X'
    x_up, x_low = images[CLASSES.index("X"), 0] > 0.3, images[CLASSES.index("x"), 0] > 0.3
    assert x_low.any(1).sum() < 0.85 * x_up.any(1).sum()


def test_fonts_hold_all_letters_and_split_is_disjoint():
    fonts = glyph_fonts()
    names = {f.name for f in fonts}
    assert {"DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "STIXGeneral.ttf", "cmr10.ttf"} <= names
    # symbol fonts that reuse the letters' code points, and the catch-all font, are not letter fonts
    assert not names & {"cmex10.ttf", "cmsy10.ttf", "LastResortHE-Regular.ttf", "DejaVuSansDisplay.ttf"}
    for f in fonts:
        cmap = TTFont(f, lazy=True).getBestCmap()
        assert all(ord(c) in cmap for c in CLASSES), f.name
    train, test = split_fonts(0)
    assert not set(train) & set(test)
    assert sorted(train + test) == fonts
    assert split_fonts(0) == (train, test)
    assert any(split_fonts(s)[1] != test for s in range(1, 5))
    assert GlyphDataset("train", 1, seed=0).fonts == train and GlyphDataset("test", 1, seed=0).fonts == test


def test_split_holds_out_whole_families():
    fonts = glyph_fonts()
    families = font_families(fonts)
    # the name table groups the cuts of a design: DejaVu Sans Bold is DejaVu Sans
    assert font_family(fonts_module.font_dir() / "DejaVuSans-Bold.ttf")[0] == "DejaVu Sans"
    assert len(families["DejaVu Sans"]) == 4 and len(families["cmr10"]) == 4  # cmb10, cmmi10, cmti10: one design
    for seed in range(6):
        train, test = split_fonts(seed)
        train_families = {font_family(f)[0] for f in train}
        test_families = {font_family(f)[0] for f in test}
        assert not train_families & test_families, seed
        assert len(test_families) == round(0.25 * len(families))
        assert all(set(families[f]) <= set(test) for f in test_families)  # every cut of a held-out family


def test_system_pool_needs_fc_list(monkeypatch):
    monkeypatch.setattr(fonts_module.shutil, "which", lambda name: None)
    fonts_module._scan_fonts.cache_clear()
    try:
        with pytest.raises(ConfigError, match="fc-list"):
            glyph_fonts("system")
    finally:
        fonts_module._scan_fonts.cache_clear()
    with pytest.raises(ConfigError, match="fonts must be one of matplotlib, system"):
        glyph_fonts("google")


def _ink_extent(images: torch.Tensor, level: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Height and width in pixels of each image's ink box (pixels > level), gaps included (the dot of an i)."""
    ink = images[:, 0] > level
    idx = torch.arange(ink.shape[-1])

    def span(mask: torch.Tensor) -> torch.Tensor:  # (n, L) bool -> last - first + 1
        last = torch.where(mask, idx, -1).amax(1)
        first = torch.where(mask, idx, ink.shape[-1]).amin(1)
        return (last - first + 1).clamp(min=0)

    return span(ink.any(2)), span(ink.any(1))


def test_both_conventions_render_and_fill_fills_the_canvas():
    test = split_fonts(0)[1][:2]
    filled, labels = render_filled(test)
    assert filled.shape == (104, 1, 32, 32) and torch.equal(labels, torch.arange(52).repeat(2))
    h, w = _ink_extent(filled, level=0)
    assert (torch.maximum(h, w) == 32).all()  # every glyph's longer side spans the canvas
    typo, typo_labels = GlyphDataset("test", 2, seed=0, jitter=0).as_tensors()
    assert torch.equal(typo_labels, labels)
    th, tw = _ink_extent(typo)
    x_low, x_up = CLASSES.index("x"), CLASSES.index("X")
    assert th[x_low] < 0.85 * th[x_up]  # ours: lowercase small
    assert h[x_low] >= 0.9 * h[x_up]  # filled: as tall as the capital
    # the training renderer's fill convention: the longer side spans 72-100 % of the canvas
    ds = GlyphDataset("test", 2, seed=0, jitter=0, fill_share=1.0)
    fh, fw = _ink_extent(ds.render(np.arange(len(ds)))[0])
    assert (torch.maximum(fh, fw) >= 0.72 * 32 - 2).all() and (torch.maximum(fh, fw) <= 32).all()
    assert (torch.maximum(fh, fw) >= 30).any() and (torch.maximum(fh, fw) <= 26).any()


def test_same_seed_same_data_other_seed_differs():
    a = GlyphDataset("train", 4, seed=3)
    images, labels = a.as_tensors()
    # a second dataset with the same arguments, rendered afresh (not from the cache)
    again, again_labels = GlyphDataset("train", 4, seed=3).render(np.arange(len(a)))
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    other, _ = GlyphDataset("train", 4, seed=4).render(np.arange(len(a)))
    assert not torch.equal(images, other)
    test_images, _ = GlyphDataset("test", 4, seed=3).render(np.arange(len(a)))
    assert not torch.equal(images, test_images)


def test_item_alone_equals_item_in_batch_and_in_worker():
    ds = GlyphDataset("test", 6, seed=1)
    images, labels = ds.as_tensors()
    for i in (0, 1, 77, 200, len(ds) - 1):
        x, y = ds[i]
        assert torch.equal(x, images[i]) and y == int(labels[i])
    loader = torch.utils.data.DataLoader(ds, batch_size=50, num_workers=1)
    assert torch.equal(torch.cat([b[0] for b in loader]), images)


def test_rendering_is_fast_enough_for_pretraining():
    ds = GlyphDataset("train", 40, seed=0)
    ds.render(np.arange(8))  # rasterise the fonts first
    import time

    start = time.process_time()  # this process's CPU time: other work on a shared machine does not count
    ds.render(np.arange(len(ds)))
    rate = len(ds) / max(time.process_time() - start, 1e-9)
    # thousands per CPU second on any recent core; the bound only catches a rendering path gone quadratic
    assert rate > 150, f"{rate:.0f} images per CPU second"


def test_bad_arguments_raise_config_error():
    with pytest.raises(ConfigError, match="split"):
        GlyphDataset("val", 1)
    with pytest.raises(ConfigError, match="n_per_class"):
        GlyphDataset("train", 0)
    with pytest.raises(ConfigError, match="seed"):
        GlyphDataset("train", 1, seed=-1)
    with pytest.raises(ConfigError, match="test_fraction"):
        split_fonts(0, test_fraction=1.0)
    with pytest.raises(ConfigError, match="fill_share"):
        GlyphDataset("train", 1, fill_share=1.5)
    with pytest.raises(IndexError):
        GlyphDataset("train", 1)[52]


def test_font_rasters_are_cached():
    path = str(glyph_fonts()[0])
    assert glyphs.font_rasters(path, 64) is glyphs.font_rasters(path, 64)
    r = glyphs.font_rasters(path, 64)
    assert r.shape == (52, 64, 64) and 0 <= float(r.min()) and float(r.max()) <= 1


def test_glyphs_is_a_registered_scenario_over_the_same_images():
    """``glyphs`` in the scenario registry: 52 classes in 4 experiences, train fonts for training, the fonts
    held out by ``font_seed`` for testing, the images GlyphDataset renders (normalised, 3 channels)."""
    from avl_peft.cl.scenarios import SCENARIOS, build_scenario

    assert "glyphs" in SCENARIOS
    bench = build_scenario("glyphs", img_size=32, seed=1, per_class=2, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert len(bench.train_stream) == 4 and bench.n_classes == 52
    assert sum(len(e.dataset) for e in bench.test_stream) == 104
    x, y, _ = bench.test_stream[0].dataset[0]
    images, labels = GlyphDataset("test", 2, seed=0, img_size=32).as_tensors()
    match = [i for i in range(len(labels)) if int(labels[i]) == int(y)]
    assert x.shape == (3, 32, 32) and any(torch.equal(x, (images[i] - 0.5).div(0.5).expand(3, -1, -1)) for i in match)
    other = build_scenario("glyphs", img_size=32, seed=1, per_class=2, font_seed=1, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert not torch.equal(other.test_stream[0].dataset[0][0], bench.test_stream[0].dataset[0][0])
