"""Reading one image file the way a user expects to see it: upright, opaque, 8-bit sRGB.

Datasets arrive from phones, scanners, Photoshop and the web, so "open and ``.convert("RGB")``"
is wrong surprisingly often: phone JPEGs are stored sideways with an EXIF rotation, transparent
PNGs turn black, 16-bit scans clip to white, CMYK prints change colour. Everything here turns
those into the picture the user saw in their viewer, or into an ``ImageError`` that names the
file and says what to do; the dataset reports that error and skips the file.

Safety: only the formats in ``IMAGE_EXTENSIONS`` are ever tried (so a renamed file cannot reach
Pillow's EPS plugin, which runs Ghostscript), and an image's size is checked against
``MAX_PIXELS`` from its header, before any pixel memory is allocated. Pillow's own global
``Image.MAX_IMAGE_PIXELS`` is left alone: this module never changes library state.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError, features

from trainer.core.errors import ImageError
from trainer.core.hashing import file_sha256 as core_file_sha256

# Largest image accepted: 80 megapixels is ~240 MB as RGB, far above any useful training image.
MAX_PIXELS = 80_000_000

# Extensions read on every Pillow build (lower case, with the dot). AVIF is added at run time by
# ``image_extensions()`` when this Pillow was built with it.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)

# Pillow plugins allowed to identify a file. (Multi-picture camera JPEGs come through "JPEG" and
# report their format as "MPO".)
_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "DIB", "GIF", "TIFF")

# Errors Pillow's decoders raise for damaged data (truncated streams, bad chunks, bad tables).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)

# EXIF orientation -> the transpose that makes the picture upright (the table ImageOps uses).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def image_extensions() -> frozenset[str]:
    """The extensions the dataset picks up: ``IMAGE_EXTENSIONS`` plus ``.avif`` if supported."""
    if features.check("avif"):
        return IMAGE_EXTENSIONS | {".avif"}
    return IMAGE_EXTENSIONS


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the file's bytes (duplicate detection and cache keys)."""
    try:
        return core_file_sha256(path)
    except OSError as exc:
        raise ImageError(f"Cannot read {path}: {exc.strerror or exc}.",
                         hint="Check that the file exists and is readable.") from None


def image_info(path: Path, *, verify: bool = False) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF rotation, read from the header only.

    With ``verify=True`` the file is also read through to its end as cheaply as the format
    allows (PNG chunk CRCs without inflating, JPEG decoded at 1/8 scale), which catches the
    common damage -- a download or copy cut short -- at a few milliseconds per image instead of
    surprising the training loop hours later.
    """
    path = Path(path)
    with _open(path) as im:
        width, height = im.size
        if _orientation(im) in (5, 6, 7, 8):
            width, height = height, width
        if verify:
            _verify(im, path)
    return width, height


def load_image(path: Path) -> Image.Image:
    """Decode ``path`` into an upright RGB image, as an image viewer would show it.

    EXIF orientation is applied; transparency is composited on white (a transparent background
    is "nothing", and black would teach the LoRA dark halos); CMYK is converted through its
    embedded ICC profile when there is one; 16-bit and float greyscale are scaled, not clipped;
    animated GIF/WebP give their first frame.
    """
    path = Path(path)
    with _open(path) as im:
        orientation = _orientation(im)  # before load(): see _orientation for why
        try:
            im.load()
        except _DECODE_ERRORS as exc:
            raise ImageError(f"{path} is damaged or truncated ({exc}).",
                             hint="Re-export or re-download it, or remove it from the dataset.") from None
        try:
            rgb = _to_rgb(im)
        except (ValueError, OSError) as exc:
            raise ImageError(f"{path} uses colour mode {im.mode}, which cannot be converted to RGB ({exc}).",
                             hint="Save it as an 8-bit RGB PNG or JPEG.") from None
    if rgb is im:  # detach from the (now closed) file
        rgb = im.copy()
    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    return rgb.transpose(transpose) if transpose is not None else rgb


def load_alpha(path: Path) -> Image.Image | None:
    """The upright alpha channel of ``path`` as an "L" image, or None when it has no transparency.

    Same file checks and EXIF rotation as ``load_image``, so the alpha lines up with its pixels.
    """
    path = Path(path)
    with _open(path) as im:
        if im.mode not in _ALPHA_MODES and "transparency" not in im.info:
            return None
        orientation = _orientation(im)
        try:
            alpha = im.convert("RGBA").getchannel("A")
        except _DECODE_ERRORS as exc:
            raise ImageError(f"{path} is damaged or truncated ({exc}).",
                             hint="Re-export or re-download it, or remove it from the dataset.") from None
    transpose = _ORIENTATION_TRANSPOSE.get(orientation)
    return alpha.transpose(transpose) if transpose is not None else alpha


# --- helpers -------------------------------------------------------------------------------------


def _open(path: Path) -> Image.Image:
    """Image.open with every failure turned into an ImageError that says what to do."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"Cannot read {path}: {exc.strerror or exc}.",
                         hint="Check that the file exists and is readable.") from None
    if size == 0:
        raise ImageError(f"{path} is empty (0 bytes).",
                         hint="The copy or download probably failed; copy it again or remove it.")
    try:
        im = Image.open(path, formats=_allowed_formats())
    except UnidentifiedImageError:
        raise ImageError(
            f"{path} is not an image this program can read (is it really a "
            f"{path.suffix.lstrip('.').upper() or 'picture'} file?).",
            hint="Open it in an image editor and save it as PNG or JPEG, or remove it.") from None
    except Image.DecompressionBombError:
        raise _too_large(path, None) from None
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{path} is damaged ({exc}).",
                         hint="Re-export or re-download it, or remove it from the dataset.") from None
    width, height = im.size
    if width * height > MAX_PIXELS:
        im.close()
        raise _too_large(path, (width, height))
    if width < 1 or height < 1:
        im.close()
        raise ImageError(f"{path} has no pixels ({width}x{height}).", hint="Remove it from the dataset.")
    return im


def _allowed_formats() -> tuple[str, ...]:
    return (*_FORMATS, "AVIF") if features.check("avif") else _FORMATS


def _too_large(path: Path, size: tuple[int, int] | None) -> ImageError:
    what = f"{size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.0f} megapixels" if size else "enormous"
    return ImageError(f"{path} is {what}, more than the {MAX_PIXELS // 1_000_000} megapixel limit.",
                      hint="Downscale it (training uses ~1 megapixel anyway) or remove it.")


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 = upright), read without decoding pixels.

    Pillow's PNG ``getexif()`` decodes the whole image to look for an eXIf chunk stored after
    the pixel data; such files are rare, so PNGs honour only an eXIf chunk before the pixels.
    ``load_image`` and ``image_info`` both use this function, so the size the dataset buckets
    by always matches the pixels the loop later gets.
    """
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except _DECODE_ERRORS + (KeyError, TypeError):
        return 1  # malformed EXIF: the orientation is a hint, never a reason to reject a picture
    return value if isinstance(value, int) and value in _ORIENTATION_TRANSPOSE else 1


def _verify(im: Image.Image, path: Path) -> None:
    """Read the file through to its end as cheaply as the format allows."""
    try:
        if im.format == "PNG":
            im.verify()  # walks every chunk and checks CRCs without inflating the pixels
        else:
            if im.format in ("JPEG", "MPO"):
                im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{path} is damaged or truncated ({exc}).",
                         hint="Re-export or re-download it, or remove it from the dataset.") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a viewer displays it."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_grey_to_uint8(np.asarray(im), mode), "L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, YCbCr, RGBX, ...


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale high-bit-depth greyscale to 0-255 by its nominal range, not by clipping.

    16-bit data spans 0-65535. Mode "I" (32-bit int) is how some TIFFs and older Pillows hold
    16-bit data, but it may also hold 8-bit values; "F" (float) is usually 0-1 but sometimes 0-255.
    The range the values actually fall in decides; anything else is stretched min-to-max.
    """
    data = values.astype(np.float64)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if mode in _SIXTEEN_BIT_MODES:
        scale, offset = 255.0 / 65535.0, 0.0
    elif lo >= 0 and hi <= (1.0 if mode == "F" else 255.0):
        scale, offset = (255.0 if mode == "F" else 1.0), 0.0
    elif mode == "F" and lo >= 0 and hi <= 255.0:
        scale, offset = 1.0, 0.0
    elif mode == "I" and lo >= 0 and hi <= 65535:
        scale, offset = 255.0 / 65535.0, 0.0
    else:
        scale, offset = 255.0 / max(hi - lo, 1e-12), -lo
    return np.clip(np.rint((data + offset) * scale), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """CMYK through its ICC profile to sRGB when possible; Pillow's formula otherwise.

    Pillow's built-in conversion ignores the ink profile, which shifts colours noticeably on
    print-ready files; Photoshop always embeds the profile, so use it when littlecms is there.
    """
    icc = im.info.get("icc_profile")
    if icc and features.check("littlecms2"):
        import io

        from PIL import ImageCms

        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(im, source, ImageCms.createProfile("sRGB"),
                                                  outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            converted = None  # a broken profile is not worth losing the picture over
        if converted is not None:
            return converted
    return im.convert("RGB")
