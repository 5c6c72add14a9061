"""Image files from user folders: one lister, one opener, an allow-list of formats and a pixel budget.

Pillow picks its decoder from a file's *content*, not its suffix: without an allow-list, a ``.png`` holding
PostScript is handed to Ghostscript, an external interpreter. :func:`open_image` passes ``formats=`` so only
the raster formats below are ever tried, and checks the pixel count from the header *before* decoding (and,
for callers that resize, the size after resizing) so a tiny file claiming a huge or very thin image is
refused by name instead of ending in a MemoryError. It opens the file itself with ``O_NONBLOCK`` and refuses
anything but a regular file, so a FIFO named ``x.png`` cannot hang a run.

:func:`class_folders` and :func:`image_files` list ``<root>/<class>/<image>`` folders with one suffix list.
They read one level only and never walk into sub-folders: torchvision's own listing walks recursively with
``followlinks=True``, so a planted link loop would make it recurse until the path is too long.
:class:`ImageFolder` is torchvision's dataset with those listers and :func:`open_image` as its loader: the
one reader of class folders (ImageNet-R, ``upstream.dataset: imagefolder:``).
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from torchvision import datasets

from ..errors import DataError

# Suffix -> the Pillow format that may open it. Only these decoders run, whatever the content.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".tif": "TIFF"}
IMAGE_FORMATS[".tiff"] = "TIFF"
IMAGE_SUFFIXES = frozenset(IMAGE_FORMATS)
_ALLOWED = tuple(sorted(set(IMAGE_FORMATS.values())))
# 64 M pixels (8192 x 8192; 256 MB as RGBA) per image, before and after resizing: far above any benchmark
# image (ImageNet-R's largest is a few thousand pixels wide), far below what exhausts memory.
IMAGE_MAX_PIXELS = 1 << 26
# A compressed image file is rarely above a few MB; 64 MiB bounds what is read before the header is parsed.
IMAGE_MAX_BYTES = 64 << 20


def class_folders(root: Path, what: str) -> list[Path]:
    """The class sub-folders of ``root`` (hidden ones skipped), sorted by name; DataError if ``root`` is no folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{what} '{root}' does not exist or is not a folder; give a folder of <class>/<image> files")
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir())


def image_files(folder: Path, what: str = "image folder") -> list[Path]:
    """The image files of one class folder, sorted by name (suffix case-insensitive, other files ignored).

    A name with an image suffix that is not a regular file (a pipe, socket or device; a folder is ignored)
    raises DataError naming it: reading it could block forever or never end.
    """
    found = []
    for path in sorted(Path(folder).iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            mode = path.stat().st_mode  # a link to an image is fine (datasets are often linked in)
        except OSError as e:
            raise DataError(f"{what}: '{path}' cannot be read ({e.strerror}); remove it") from None
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            raise DataError(
                f"{what}: '{path}' has an image suffix but is not a regular file (a pipe, socket or device); remove it"
            )
        found.append(path)
    return found


def check_image(
    path: str | Path,
    *,
    what: str = "image",
    max_pixels: int = IMAGE_MAX_PIXELS,
    short_side: int | None = None,
    fix: str = "remove or replace the file",
) -> tuple[int, int]:
    """:func:`open_image`'s checks from the header alone (nothing decoded): ``(width, height)`` or DataError."""
    return open_image(path, None, what=what, max_pixels=max_pixels, short_side=short_side, fix=fix).size


def open_image(
    path: str | Path,
    mode: str | None,
    *,
    what: str = "image",
    max_pixels: int = IMAGE_MAX_PIXELS,
    short_side: int | None = None,
    fix: str = "remove or replace the file",
) -> Image.Image:
    """The image at ``path``, decoded and converted to ``mode`` ('RGB', 'L'), within a pixel budget.

    With ``mode=None`` nothing is decoded: the unloaded image (closed; only ``size`` and ``format`` valid).

    Only PNG, JPEG, BMP, GIF and TIFF decoders are tried. ``max_pixels`` bounds width x height (read from
    the header, before decoding) and, when the caller will resize the shorter side to ``short_side``, the
    pixels after that resize too (a 1 x 100,000 strip is small, but 224 x 22,400,000 once resized). Raises
    DataError naming ``<what> '<path>'`` and ``fix`` for a file that is missing, not regular, too large,
    not one of those formats, corrupt or over budget.
    """
    path = Path(path)
    label = f"{what} '{path}'"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DataError(f"{label} cannot be opened ({e.strerror}); {fix}") from None
    info = os.fstat(fd)  # of the file opened, before Python wraps it (a folder would fail there)
    if not stat.S_ISREG(info.st_mode) or info.st_size > IMAGE_MAX_BYTES:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{label} is not a regular file (a pipe, socket, device or folder); {fix}")
        raise DataError(f"{label} is {info.st_size:,} bytes, more than the {IMAGE_MAX_BYTES:,} allowed; {fix}")
    with open(fd, "rb") as handle:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns (or raises) only above ~89 M pixels; ours is below it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                with Image.open(handle, formats=_ALLOWED) as img:
                    width, height = img.size
                    # Pillow's own limit, when a user lowered it, counts too.
                    budget = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
                    _check_pixels(label, width, height, budget, short_side, fix)
                    return img if mode is None else img.convert(mode)
            except DataError:
                raise
            except Image.DecompressionBombError as e:
                raise DataError(f"{label} is too large to decode safely ({e}); {fix}") from None
            except Image.UnidentifiedImageError:
                raise DataError(
                    f"{label} is not a {', '.join(_ALLOWED)} image (other formats are never decoded); {fix}"
                ) from None
            except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:  # Pillow's "corrupt file"
                raise DataError(f"{label} could not be read ({type(e).__name__}: {e}); {fix}") from None


def _check_pixels(label: str, width: int, height: int, budget: int, short_side: int | None, fix: str) -> None:
    if width < 1 or height < 1 or width * height > budget:
        raise DataError(
            f"{label} is too large to decode safely ({width} x {height} pixels, more than the {budget:,} "
            f"allowed); {fix}"
        )
    if short_side is not None:
        # Resizing the shorter side to short_side scales the longer one by the same factor.
        resized = short_side * -(-short_side * max(width, height) // min(width, height))
        if resized > budget:
            raise DataError(
                f"{label} is too large to decode safely: {width} x {height} pixels become {resized:,} once its "
                f"shorter side is resized to {short_side} (more than the {budget:,} allowed); {fix}"
            )


class ImageFolder(datasets.ImageFolder):
    """``<root>/<class>/<image>`` as torchvision's ``ImageFolder``, read through this module's checks.

    Classes are the sub-folders in sorted name order (hidden ones skipped), files sorted by name within a
    class (:func:`image_files`: one level, allow-listed suffixes); images are decoded by :func:`open_image`
    in ``mode`` within the pixel budget (``short_side``: the side a transform will resize to). ``samples``
    and ``targets`` are known without opening any image. A folder without classes, or a class without
    images, raises DataError naming it (``what`` says which folder it is).
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        what: str = "image folder",
        mode: str = "RGB",
        short_side: int | None = None,
    ):
        self.what = what
        loader = partial(open_image, mode=mode, what=f"{what} image", short_side=short_side)
        super().__init__(str(root), transform=transform, loader=loader)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = [p.name for p in class_folders(Path(directory), self.what)]
        if not classes:
            raise DataError(f"{self.what} '{directory}' has no class sub-folders; expected <class>/<image> files")
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(  # type: ignore[override]  # torchvision calls it on the instance with these arguments
        self, directory: str | Path, class_to_idx: dict[str, int], *args: Any, **kwargs: Any
    ) -> list[tuple[str, int]]:
        samples = []
        for name, label in class_to_idx.items():
            files = image_files(Path(directory) / name, f"{self.what} class folder")
            if not files:
                raise DataError(
                    f"class folder '{Path(directory) / name}' has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                    "add some or remove it"
                )
            samples += [(str(f), label) for f in files]
        return samples
