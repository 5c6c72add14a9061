"""The fonts of the ``glyphs`` dataset: which font files, which family each belongs to, and the split.

Two font pools:

* ``matplotlib`` (the default, offline everywhere): the TrueType fonts matplotlib ships
  (``mpl-data/fonts/ttf``). The list depends only on the installed matplotlib, so builds are reproducible.
* ``system``: those plus every TrueType/OpenType font fontconfig (``fc-list``) knows on this machine, e.g.
  from font packages (``apt install fonts-liberation fonts-noto-core``...). More type designs to learn
  from, but the list differs between machines: the pretrain cache key includes it
  (:func:`font_manifest`), so a machine with other fonts builds its own weights.

Only fonts whose character map sends every one of the 52 letters to a glyph *named* after that letter are
used: checking the names, not just the code points, drops symbol fonts that reuse the ASCII code points
(``cmex10``, ``cmsy10``) and the Last Resort font, which maps every code point to one placeholder. A font
that is the same design as one already listed (same family and style, e.g. the system's copy of a font
matplotlib ships) is listed once.

**Split by family.** :func:`split_fonts` holds out whole *families*, read from each font file's name table
(FreeType's family name, via matplotlib's ``FT2Font``): DejaVu Sans Bold and DejaVu Sans are one family,
so a held-out family never has a cut in training and test accuracy measures unseen type designs, not a
bold or oblique version of a design trained on.
"""

from __future__ import annotations

import importlib.util
import shutil
import string
import subprocess
from functools import lru_cache
from pathlib import Path

import numpy as np

from ...errors import ConfigError, DataError
from ...validate import is_int, is_number

CLASSES: tuple[str, ...] = tuple(string.ascii_uppercase + string.ascii_lowercase)  # the head order
FONT_POOLS = ("matplotlib", "system")
_SPLIT_STREAM = 0x5EED_F047  # separates the font-split generator from the per-sample generators
# matplotlib's Computer Modern conversions name every cut its own family (cmb10 is the bold of cmr10,
# cmti10 and cmmi10 its text and math italics): one design, so one family for the split.
_FAMILY_ALIASES = {"cmb10": "cmr10", "cmti10": "cmr10", "cmmi10": "cmr10"}
_FONT_SUFFIXES = (".ttf", ".otf")


def font_dir() -> Path:
    """matplotlib's bundled TrueType folder, found without importing matplotlib (which is slow)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the glyphs dataset draws letters from matplotlib's bundled fonts: pip install matplotlib")
    folder = Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf"
    if not folder.is_dir():
        raise DataError(f"matplotlib's font folder '{folder}' is missing; reinstall matplotlib")
    return folder


def _has_all_letters(path: Path) -> bool:
    from fontTools.ttLib import TTFont

    try:
        cmap = TTFont(path, lazy=True, fontNumber=0).getBestCmap() or {}
    except Exception:  # unreadable or not a TrueType/OpenType file: simply not a usable font
        return False
    names = [cmap.get(ord(c)) for c in CLASSES]
    # Adobe glyph names of the ASCII letters are the letters themselves; a symbol font reusing the
    # code points (cmex10's 'A' is 'parenrightbt') or a catch-all font fails this check.
    return names == list(CLASSES)


@lru_cache(maxsize=256)
def _name_table(path: str) -> tuple[str, str]:
    from matplotlib.ft2font import FT2Font

    font = FT2Font(path)
    return font.family_name or Path(path).stem, font.style_name or ""


def font_family(path: str | Path) -> tuple[str, str]:
    """``(family, style)`` of a font file from its name table (FreeType's reading, via matplotlib)."""
    family, style = _name_table(str(path))
    return _FAMILY_ALIASES.get(family, family), style


def _system_font_files() -> list[Path]:
    exe = shutil.which("fc-list")
    if exe is None:
        raise ConfigError(
            "data.fonts: system reads the installed fonts with fontconfig's fc-list, which is not on PATH; "
            "install fontconfig or use data.fonts: matplotlib"
        )
    try:
        out = subprocess.run([exe, "--format", "%{file}\n"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise DataError(f"fc-list failed ({e}); use data.fonts: matplotlib") from None
    return sorted({Path(line) for line in out.stdout.splitlines() if line.lower().endswith(_FONT_SUFFIXES)})


@lru_cache(maxsize=4)
def _scan_fonts(pool: str, folder: str) -> tuple[Path, ...]:
    files = sorted(Path(folder).glob("*.ttf"))
    if pool == "system":
        files += _system_font_files()
    seen: set[tuple[str, str]] = set()
    fonts = []
    for path in files:  # matplotlib's first, then the system's (sorted): the first copy of a design wins
        if not _has_all_letters(path):
            continue
        key = _name_table(str(path))  # the design itself, before the split's family aliases
        if key not in seen:
            seen.add(key)
            fonts.append(path)
    return tuple(sorted(fonts, key=lambda p: (p.name, str(p))))


def _check_pool(pool: object) -> str:
    if pool not in FONT_POOLS:
        raise ConfigError(f"fonts must be one of {', '.join(FONT_POOLS)}, got {pool!r}")
    return str(pool)


def glyph_fonts(pool: str = "matplotlib") -> list[Path]:
    """The fonts of ``pool`` that contain all 52 Latin letters, sorted by file name."""
    fonts = list(_scan_fonts(_check_pool(pool), str(font_dir())))
    if len(font_families(fonts)) < 2:
        raise DataError(
            f"only {len(fonts)} font(s) of {len(font_families(fonts))} famil(ies) with all 52 letters in the "
            f"'{pool}' pool; the glyphs dataset needs two families (one to train on, one held out). Reinstall "
            "matplotlib."
        )
    return fonts


def font_families(fonts: list[Path]) -> dict[str, list[Path]]:
    """Fonts grouped by family, families sorted by name."""
    groups: dict[str, list[Path]] = {}
    for f in fonts:
        groups.setdefault(font_family(f)[0], []).append(f)
    return dict(sorted(groups.items()))


def font_manifest(pool: str = "matplotlib") -> list[list]:
    """``[file name, family, style, bytes]`` of each font of ``pool``: what a pretrain cache key must include."""
    return [[f.name, *font_family(f), f.stat().st_size] for f in glyph_fonts(pool)]


def check_seed(seed: object, key: str = "seed") -> int:
    """``seed`` as an int; ConfigError naming ``key`` unless it is a non-negative integer."""
    if not is_int(seed) or seed < 0:
        raise ConfigError(f"{key} must be a non-negative integer, got {seed!r}")
    return int(seed)


def split_fonts(seed: int, test_fraction: float = 0.25, pool: str = "matplotlib") -> tuple[list[Path], list[Path]]:
    """Hold out whole font families: ``(train_fonts, test_fonts)``, disjoint, each sorted by name.

    A seeded permutation of the families (:func:`font_families`) picks ``round(test_fraction * n_families)``
    of them (at least one, and at least one is left to train on); all their fonts are test fonts. No
    family has a font on both sides. The same seed and pool always give the same split.
    """
    seed = check_seed(seed)
    if not is_number(test_fraction) or not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}")
    families = list(font_families(glyph_fonts(pool)).values())
    n_test = min(max(1, round(test_fraction * len(families))), len(families) - 1)
    order = np.random.default_rng((seed, _SPLIT_STREAM)).permutation(len(families))
    test = sorted(f for i in order[:n_test] for f in families[i])
    train = sorted(f for i in order[n_test:] for f in families[i])
    return train, test
