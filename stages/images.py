"""Finding, decoding and resizing images so that real photos survive.

Decoding applies the EXIF orientation, turns grayscale, palette, RGBA, CMYK and 16-bit images into
8-bit RGB, and keeps Pillow's decompression-bomb limit. A file that cannot be decoded raises
``ImageError`` with a reason; the extract stage reports it and skips it.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import AcsegError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


class ImageError(Exception):
    """One image that cannot be used; the message says why."""


@dataclass(frozen=True)
class ImageItem:
    name: str  # stable name stored in artifacts: the path relative to its input root
    path: str  # absolute path on disk


def _relname(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


def discover(inputs: list[str], list_file_text: str | None = None) -> list[ImageItem]:
    """Expand folders (recursively), files and list files into a deterministic list of images.

    A folder contributes its images with names relative to it; a file contributes its base name; a
    ``.txt`` or ``.lst`` file is a list of image paths, one per line (relative to the list's folder).
    ``list_file_text`` is the content of a list read from stdin (``-``), relative to the working folder.
    """
    items: list[ImageItem] = []

    def add_file(p: Path, name: str) -> None:
        items.append(ImageItem(name=name, path=str(p.absolute())))

    def add_list(text: str, base: Path) -> None:
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            if not p.is_absolute():
                p = base / p
            add_file(p, p.name)

    if list_file_text is not None:
        add_list(list_file_text, Path.cwd())
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                (q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file()),
                key=lambda q: q.relative_to(p).as_posix(),
            )
            for q in found:
                add_file(q, _relname(q, p))
        elif p.suffix.lower() in {".txt", ".lst"} and p.is_file():
            add_list(p.read_text(encoding="utf-8", errors="surrogateescape"), p.parent)
        elif p.exists():
            add_file(p, p.name)
        else:
            raise AcsegError(f"input {raw} does not exist", "pass image files, folders or a .txt list of images")
    seen: dict[str, str] = {}
    for it in items:
        if it.name in seen and seen[it.name] != it.path:
            raise AcsegError(
                f"two inputs share the name {it.name!r} ({seen[it.name]} and {it.path})",
                "pass their common parent folder instead, so names keep their subfolders",
            )
        seen[it.name] = it.path
    # the same file listed twice is kept once
    uniq: dict[str, ImageItem] = {}
    for it in items:
        uniq.setdefault(it.name, it)
    return list(uniq.values())


def _exif_transposes(im: Image.Image) -> bool:
    try:
        return im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:
        return False


def _regular_file(path: str) -> None:
    """Open only regular files: a FIFO or device named .png would block or never end."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except OSError as e:
        raise ImageError(f"cannot access ({e.strerror})") from None
    if stat.S_ISDIR(mode):
        raise ImageError("is a folder")
    if not stat.S_ISREG(mode):
        raise ImageError("not a regular file (a pipe, socket or device)")


def _bomb_filter(max_pixels: int | None) -> str:
    """How Pillow's DecompressionBombWarning is taken: as an error under Pillow's own limit (``None``),
    ignored under ``max_pixels`` (checked by ``_check_pixels``). Pillow's hard limit (twice its own) holds in
    both: acseg never changes ``Image.MAX_IMAGE_PIXELS``, which is the whole process's."""
    return "error" if max_pixels is None else "ignore"


def _check_pixels(w: int, h: int, max_pixels: int | None) -> None:
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(f"image too large ({w * h:,} pixels, above the limit of {max_pixels:,})")


def peek_size(path: str, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) after EXIF orientation, reading only the header. ``max_pixels``: refuse larger images
    (None: Pillow's limit, about 89 megapixels)."""
    _regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(_bomb_filter(max_pixels), Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if _exif_transposes(im):
                    w, h = h, w
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb refused ({e})") from None
    except Image.DecompressionBombWarning as e:
        raise ImageError(f"image too large ({e})") from None
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except IsADirectoryError:
        raise ImageError("is a folder") from None
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError from broken headers
        raise ImageError(f"not a readable image ({type(e).__name__}: {e})") from None
    if w <= 0 or h <= 0:
        raise ImageError("image has zero size")
    _check_pixels(w, h, max_pixels)
    return h, w


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB (16-bit and float grayscale are rescaled, alpha composited on black)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im)  # as decoded (2 or 4 bytes a pixel); rescaled a band of rows at a time
        if im.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        else:
            lo, hi = float(np.min(a)), float(np.max(a))
            if hi <= lo:
                hi = lo + 1.0
        out = np.empty(a.shape, np.uint8)
        rows = max(1, (1 << 18) // max(1, a.shape[1]))  # 256 K pixels: a few MB of float64 at a time
        for r in range(0, a.shape[0], rows):
            b = a[r : r + rows].astype(np.float64)
            out[r : r + rows] = np.clip((b - lo) / (hi - lo) * 255.0 + 0.5, 0, 255)
        return Image.fromarray(out, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: str, max_pixels: int | None = None, at_least: int | None = None) -> Image.Image:
    """Decode one image fully: EXIF orientation applied, 8-bit RGB. Raises ImageError (``max_pixels``: as in
    ``peek_size``, checked before decoding). ``at_least``: a JPEG may be decoded at a reduced scale (1/2 to 1/8)
    that keeps both sides at least this long, for callers that shrink it anyway."""
    _regular_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter(_bomb_filter(max_pixels), Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_pixels(*im.size, max_pixels)
                if at_least and im.format == "JPEG":
                    im.draft(im.mode, (at_least, at_least))
                im.seek(0)  # first frame of an animation
                im.load()
                im = ImageOps.exif_transpose(im) or im
                return to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"decompression bomb refused ({e})") from None
    except Exception as e:
        raise ImageError(f"cannot decode ({type(e).__name__}: {e})") from None


def target_grid(height: int, width: int, short_side: int, patch: int) -> tuple[int, int]:
    """Patch grid (rows, cols) for an image resized so its short side is ``short_side`` (aspect kept),
    both sides rounded to a multiple of ``patch`` (at least one patch)."""
    s = max(patch, int(round(short_side / patch)) * patch)
    if height <= width:
        h, w = s, width * s / height
    else:
        h, w = height * s / width, s
    return max(1, int(round(h / patch))), max(1, int(round(w / patch)))


def resize_normalise(im: Image.Image, grid: tuple[int, int], patch: int, mean, std) -> np.ndarray:
    """RGB image -> float32 CHW array of size grid*patch, normalised with the backbone's mean/std."""
    gh, gw = grid
    r = im.resize((gw * patch, gh * patch), Image.BICUBIC)
    a = np.asarray(r, dtype=np.float32) / 255.0
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def display_name(name: str) -> str:
    """A printable form of a name that may hold undecodable bytes."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def safe_output_path(root: Path, name: str, suffix: str) -> Path:
    """``root/name`` with ``suffix`` in place of the extension; refuses names that leave ``root``."""
    if not name or "\x00" in name:
        raise AcsegError(f"image name {display_name(name)!r} is empty or holds a NUL byte", "rename the image")
    p = Path(name)
    if p.is_absolute() or any(part == ".." for part in p.parts):
        raise AcsegError(f"image name {display_name(name)!r} would write outside {root}", "rename the image")
    out = (root / p).with_suffix(suffix)
    root_r = root.resolve()
    if os.path.commonpath([str(root_r), str(out.resolve())]) != str(root_r):
        raise AcsegError(f"image name {display_name(name)!r} would write outside {root}", "rename the image")
    return out


def output_paths(root: Path, names: list[str], suffix: str) -> list[Path]:
    """One path per image name under ``root`` (``safe_output_path``), all different: names that differ only
    by their extension (``a.png``, ``a.jpg``) keep it (``a.png.png``, ``a.jpg.png``), and names given twice
    get ``~2``, ``~3``."""
    paths = [safe_output_path(root, n, suffix) for n in names]
    count: dict[Path, int] = {}
    for p in paths:
        count[p] = count.get(p, 0) + 1
    if len(count) == len(paths):
        return paths
    clashing = [i for i, p in enumerate(paths) if count[p] > 1]
    taken = {p for p in paths if count[p] == 1}
    for i in clashing:
        p = safe_output_path(root, names[i] + ".x", suffix)  # keeps the name's own extension
        k = 1
        while p in taken:
            k += 1
            p = safe_output_path(root, f"{names[i]}~{k}.x", suffix)
        taken.add(p)
        paths[i] = p
    logging.getLogger("acseg").warning(
        "%d images share a name apart from the extension; their outputs keep it (e.g. %s)",
        len(clashing),
        paths[clashing[0]].name,
    )
    return paths


def check_photos(sources: list, needs: str = "--crf", instead: str = "drop --crf") -> None:
    """A step that reads each original photo (``needs``) refuses at once, in one line, when some are not
    readable; ``instead`` says how to go without it."""
    missing = [s for s in sources if not Path(s).is_file()]
    if missing:
        raise AcsegError(
            f"{needs} needs the original photos, and {len(missing)} of {len(sources)} are not readable "
            f"(first: {missing[0]})",
            f"restore them at the paths the features were extracted from, or {instead}",
        )
