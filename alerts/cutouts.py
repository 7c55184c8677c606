"""Cutout bytes -> pixels: gunzip, FITS image, 63x63 canvas, 21x21 centre crop.

Decisions (documented in README, "Cutouts"):
* The crop is the 21x21 centre of the 63x63 stamp (pixels 21..41 on both axes, the candidate at 31).
* A stamp smaller than 63 on an axis (CCD edge) is placed on a 63x63 canvas on the side away from
  the CCD edge it was cut by (known from candidate xpos/ypos: the low half of the CCD means the
  missing pixels are on the low side); without xpos/ypos it is centred. Missing pixels are NaN and
  the alert is flagged ``padded``. A larger stamp is centre-cropped to 63.
* NaN/inf pixels are kept as NaN here; normalisation (model/preprocess.py) turns them into 0.
* A missing, non-gzip, non-FITS, non-2-D or too large cutout, or a crop with no finite pixel in
  a channel, raises CutoutError: the alert is dead-lettered, since the model cannot see anything.

Why a hand-written FITS reader: astropy costs ~320 us per cutout in fixed overhead; ZTF cutouts are
one primary HDU of 32/64-bit floats, which is a header of 80-byte cards and a big-endian array.
Anything else (integer BITPIX, BSCALE/BZERO, extensions, odd headers) goes to astropy, so the fast
path never changes the result (tests compare both on every real alert).
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from isal import isal_zlib

from alerts.errors import CutoutError

STAMP_SIZE = 63
CROP_SIZE = 21
_CROP_LO = (STAMP_SIZE - CROP_SIZE) // 2  # 21
CCD_HALF_X = 3072 / 2  # ZTF CCD quadrants: 3072 x 3080 pixels
CCD_HALF_Y = 3080 / 2
MAX_PIXELS = 1024 * 1024
_FITS_BLOCK = 2880
_CARD = 80
_FLOAT_DTYPES = {-32: ">f4", -64: ">f8"}


MAX_STAMP_BYTES = 4 * 1024 * 1024  # DecodeLimits.max_stamp_bytes


def gunzip(data: bytes, max_bytes: int = MAX_STAMP_BYTES) -> bytes:
    """One gzip member -> bytes with ISA-L's inflate (about 2x zlib's), never more than
    ``max_bytes`` (``cutout_too_large`` past it: a 65 KB stamp can claim gigabytes). Raises
    CutoutError if not gzip, truncated, or followed by anything (a second member would be read by
    one gzip reader and ignored by another)."""
    if len(data) < 18 or data[:2] != b"\x1f\x8b":
        raise CutoutError("cutout is not gzip data", reason="cutout_not_gzip")
    try:
        d = isal_zlib.decompressobj(wbits=31)
        out = d.decompress(data, max_bytes + 1)
    except Exception as e:
        raise CutoutError(f"cutout gunzip failed: {e}", reason="cutout_not_gzip") from e
    if len(out) > max_bytes or d.unconsumed_tail:
        raise CutoutError(f"cutout inflates past {max_bytes} bytes", reason="cutout_too_large")
    if not d.eof:
        raise CutoutError("cutout gzip stream is truncated", reason="cutout_not_gzip")
    if d.unused_data:
        raise CutoutError("data after the cutout's gzip member", reason="cutout_not_gzip")
    return bytes(out)


def _header_cards(raw: bytes) -> tuple[dict[str, str], int | None]:
    """The primary header's ``KEY = value`` cards (at most 40 blocks) and the offset of the data
    after its END card (None when there is no END within them)."""
    cards: dict[str, str] = {}
    limit = min(len(raw) - len(raw) % _FITS_BLOCK, 40 * _FITS_BLOCK)
    for pos in range(0, limit, _CARD):
        key = raw[pos : pos + 8].rstrip()
        if key == b"END":
            return cards, pos - pos % _FITS_BLOCK + _FITS_BLOCK
        if raw[pos + 8 : pos + 10] == b"= ":
            value = raw[pos + 10 : pos + _CARD].split(b"/", 1)[0].strip()
            cards[key.decode("ascii", "replace")] = value.decode("ascii", "replace")
    return cards, None


def _fast_fits(raw: bytes, header: tuple[dict[str, str], int | None] | None = None) -> np.ndarray | None:
    """Primary-HDU float image by direct parse, or None to fall back to astropy. ``header``: the
    primary header as ``_header_cards`` read it, when the caller has it already."""
    cards, pos = _header_cards(raw) if header is None else header
    if pos is None:
        return None
    try:
        bitpix = int(cards["BITPIX"])
        naxis = int(cards["NAXIS"])
        if naxis != 2 or bitpix not in _FLOAT_DTYPES:
            return None
        nx, ny = int(cards["NAXIS1"]), int(cards["NAXIS2"])
        if float(cards.get("BSCALE", "1")) != 1.0 or float(cards.get("BZERO", "0")) != 0.0:
            return None
    except (KeyError, ValueError):
        return None
    if nx <= 0 or ny <= 0 or nx * ny > MAX_PIXELS:
        return None
    dtype = np.dtype(_FLOAT_DTYPES[bitpix])
    if pos + nx * ny * dtype.itemsize > len(raw):
        return None
    return np.frombuffer(raw, dtype=dtype, count=nx * ny, offset=pos).reshape(ny, nx)


def _header_size_check(raw: bytes) -> None:
    """Refuse an image whose header claims more than MAX_PIXELS before astropy allocates it
    (astropy scales BSCALE images to floats first: +580 MB from a 65 KB stamp)."""
    cards, _ = _header_cards(raw)
    try:
        size = _declared_pixels(cards)
    except ValueError as e:
        raise CutoutError(f"cutout FITS header is not readable: {e}", reason="cutout_bad_fits") from e
    if size > MAX_PIXELS:
        raise CutoutError(f"cutout FITS header claims {size} pixels", reason="cutout_too_large")


# Cards whose value astropy loops over when it builds an HDU (axes; a table's columns), before
# anything can be checked: NAXIS = 2147483647 kept it busy for minutes (found by the FITS-header
# property test, tests/unit/test_decoder_properties.py). The FITS standard allows at most 999.
_COUNT_CARD = re.compile(rb"(?:NAXIS   |TFIELDS )= *([-+]?[0-9]{1,40})")
MAX_FITS_COUNT = 999


def _count_cards_check(raw: bytes) -> None:
    """Refuse a file in which any HDU's header claims more than 999 axes or table columns."""
    for m in _COUNT_CARD.finditer(raw):
        if m.start() % _CARD == 0 and not 0 <= int(m.group(1)) <= MAX_FITS_COUNT:
            raise CutoutError(f"cutout FITS header claims {m.group(0)[:40]!r}", reason="cutout_bad_fits")


def _declared_pixels(header: Mapping[str, Any]) -> int:
    """Pixels a header declares (NAXIS1 x ... x NAXISn), before anything is allocated: of our own
    card reader (values as text) or of astropy (numbers). ValueError for a value that is no integer."""
    size = 1
    for i in range(1, min(int(header.get("NAXIS", 0)), MAX_FITS_COUNT) + 1):
        size *= max(int(header.get(f"NAXIS{i}", 0)), 0)
    return size


def _astropy_fits(raw: bytes) -> np.ndarray:
    """The image of the primary HDU, else of the first extension when it is a plain image.

    Tile-compressed HDUs are never decompressed (``disable_image_compression``): their pixel count
    is only known inside the compressed table, and a 55 KB message with a 16000x16000 GZIP_1 image
    took astropy 6.6 s and ~1 GB before any size could be checked (tests/attacks.py). HDUs are read
    lazily, so a file of a thousand extensions costs only the ones looked at."""
    from astropy.io import fits  # imported lazily: only the fallback path pays for it

    _header_size_check(raw)
    _count_cards_check(raw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(io.BytesIO(raw), memmap=False, lazy_load_hdus=True, disable_image_compression=True) as hdul:
                data = hdul[0].data
                if data is None:  # hdul[1], not len(hdul): len would read every HDU
                    try:
                        ext = hdul[1]
                    except IndexError:
                        ext = None
                    if not isinstance(ext, fits.ImageHDU):
                        raise CutoutError("cutout FITS holds no 2-D image", reason="cutout_bad_fits")
                    if _declared_pixels(ext.header) > MAX_PIXELS:
                        raise CutoutError("cutout FITS extension claims too many pixels", reason="cutout_too_large")
                    data = ext.data
                arr = None if data is None else np.array(data)
    except CutoutError:
        raise
    except Exception as e:
        raise CutoutError(f"cutout is not a readable FITS image: {e}", reason="cutout_bad_fits") from e
    if arr is None or arr.ndim != 2 or arr.size == 0:
        raise CutoutError("cutout FITS holds no 2-D image", reason="cutout_bad_fits")
    if arr.size > MAX_PIXELS:
        raise CutoutError(f"cutout of {arr.shape} is too large", reason="cutout_too_large")
    return arr


def fits_image(raw: bytes, *, fast: bool = True) -> np.ndarray:
    """The 2-D image of a FITS file (fast path when possible, else astropy)."""
    img = _fast_fits(raw) if fast else None
    return img if img is not None else _astropy_fits(raw)


def _pad_before(size: int, pos: float | None, half: float) -> int:
    """Where a stamp narrower than 63 pixels sits on the 63-pixel canvas along one axis.

    ZTF cuts a stamp short only at a CCD edge, on the edge's side; the stamp is centred on the
    detection, which is on the CCD, so an edge-cut stamp keeps its centre pixel and the whole other
    side: at least 32 pixels. A narrower one was not cut by an edge but around its centre, by
    whoever wrote the alert (a re-packaged alert with small stamps), so it is centred, as a stamp
    without a position is; placed by the edge rule it would have missed the crop (a 21x21 stamp
    gave an all-NaN crop, a dead letter)."""
    missing = STAMP_SIZE - size
    if pos is None or not np.isfinite(pos) or size <= STAMP_SIZE // 2:
        return missing // 2
    return missing if pos < half else 0


def centre_crop(img: np.ndarray, xpos: float | None, ypos: float | None) -> tuple[np.ndarray, bool]:
    """(ny, nx) image -> (21, 21) float32 crop of the 63x63 stamp, and whether it was padded."""
    ny, nx = img.shape
    if ny == STAMP_SIZE and nx == STAMP_SIZE:
        crop = img[_CROP_LO : _CROP_LO + CROP_SIZE, _CROP_LO : _CROP_LO + CROP_SIZE]
        return crop.astype(np.float32), False
    if ny > STAMP_SIZE:
        lo = (ny - STAMP_SIZE) // 2
        img, ny = img[lo : lo + STAMP_SIZE], STAMP_SIZE
    if nx > STAMP_SIZE:
        lo = (nx - STAMP_SIZE) // 2
        img, nx = img[:, lo : lo + STAMP_SIZE], STAMP_SIZE
    padded = ny < STAMP_SIZE or nx < STAMP_SIZE
    canvas = np.full((STAMP_SIZE, STAMP_SIZE), np.nan, dtype=np.float32)
    y0 = _pad_before(ny, ypos, CCD_HALF_Y)
    x0 = _pad_before(nx, xpos, CCD_HALF_X)
    canvas[y0 : y0 + ny, x0 : x0 + nx] = img
    crop = canvas[_CROP_LO : _CROP_LO + CROP_SIZE, _CROP_LO : _CROP_LO + CROP_SIZE]
    return crop.copy(), padded


@dataclass(frozen=True, slots=True)
class StampPixels:
    """Raw (unnormalised) science and difference crops, NaN where the camera had no pixel."""

    pixels: np.ndarray  # (2, 21, 21) float32
    padded: bool
    nan_fraction: tuple[float, float]


def cutout_crop(
    gz: bytes | None, name: str, xpos: float | None, ypos: float | None, *, fast: bool = True,
    max_bytes: int = MAX_STAMP_BYTES,
) -> tuple[np.ndarray, bool]:
    if gz is None:
        raise CutoutError(f"{name} cutout is missing", reason="cutout_missing")
    img = fits_image(_fits_bytes(gz, name, max_bytes), fast=fast)
    return centre_crop(img, xpos, ypos)


FITS_MAGIC = b"SIMPLE  ="  # the first card of every FITS file


def _within(raw: bytes, name: str, max_bytes: int) -> bytes:
    """An uncompressed cutout, refused (``cutout_too_large``) past ``max_bytes``."""
    if len(raw) > max_bytes:
        raise CutoutError(f"{name} cutout of {len(raw)} bytes (limit {max_bytes})", reason="cutout_too_large")
    return raw


def _fits_bytes(data: bytes, name: str, max_bytes: int) -> bytes:
    """A ZTF cutout's FITS file: gunzipped, as ZTF sends it, or as it is where a producer that
    re-serialised the alert stored it uncompressed (it is the same image, so it is not lost to the
    dead letters). Either way at most ``max_bytes``."""
    return _within(data, name, max_bytes) if data.startswith(FITS_MAGIC) else gunzip(data, max_bytes)


def stamp_pixels(
    science: bytes | None,
    difference: bytes | None,
    xpos: float | None = None,
    ypos: float | None = None,
    *,
    fast: bool = True,
    max_bytes: int = MAX_STAMP_BYTES,
) -> StampPixels:
    """Science + difference gzipped FITS -> (2, 21, 21) raw crops. Pure."""
    sci, pad_s = cutout_crop(science, "science", xpos, ypos, fast=fast, max_bytes=max_bytes)
    dif, pad_d = cutout_crop(difference, "difference", xpos, ypos, fast=fast, max_bytes=max_bytes)
    return _stamp(np.stack([sci, dif]), pad_s or pad_d)


def _stamp(pixels: np.ndarray, padded: bool) -> StampPixels:
    """(2, 21, 21) crops -> StampPixels; CutoutError when a channel has no finite pixel."""
    pixels = pixels.astype(np.float32, copy=False)
    finite = np.isfinite(pixels)
    n = CROP_SIZE * CROP_SIZE
    counts = finite.reshape(2, -1).sum(axis=1)
    if counts.min() == 0:
        raise CutoutError("a cutout has no finite pixel in the 21x21 crop", reason="cutout_all_nan")
    nan_fraction = (float(1 - counts[0] / n), float(1 - counts[1] / n))
    return StampPixels(pixels, padded, nan_fraction)


# ---- Rubin/LSST ------------------------------------------------------------------------------
# Rubin cutouts are uncompressed FITS written by astropy's CCDData: the image (float32, nJy) in the
# primary HDU, then UNCERT and PSFIMAGE extensions; square, 30 to 102 pixels at 0.2" per pixel,
# the source at the reference pixel (CRPIX). The model's input is the centre 30x30 pixels (6", the
# field every cutout has) around the source, resampled to 21x21 by area (flux-conserving), a fixed
# 0.286" per input pixel. Measured (bench/rubin_stamps.py, docs/rubin.md): ZTF's 21" field needs
# 105-pixel cutouts (none of the real ones); a 21x21 crop of native pixels holds only ~half of the
# difference signal at the seeing of the real alerts (PSF FWHM ~9.7 native pixels).
RUBIN_FIELD = 30


def _source_start(cards: dict[str, str], key: str, size: int) -> int:
    """First pixel (0-based) of the RUBIN_FIELD window centred on the source on one axis (the
    reference pixel, FITS 1-based; the image centre without one)."""
    try:
        centre = float(cards[key]) - 1.0
        if not np.isfinite(centre) or not 0.0 <= centre < size:
            raise ValueError
    except (KeyError, ValueError, OverflowError):
        centre = (size - 1) / 2.0
    return round(centre - (RUBIN_FIELD - 1) / 2.0)


def window(img: np.ndarray, x0: int, y0: int, size: int) -> tuple[np.ndarray, bool]:
    """``size`` x ``size`` float32 window of ``img`` from (x0, y0), NaN where it leaves the image,
    and whether it did."""
    ny, nx = img.shape
    if x0 >= 0 and x0 + size <= nx and y0 >= 0 and y0 + size <= ny:
        return img[y0 : y0 + size, x0 : x0 + size].astype(np.float32), False
    out = np.full((size, size), np.nan, dtype=np.float32)
    sx, sy, ex, ey = max(x0, 0), max(y0, 0), min(x0 + size, nx), min(y0 + size, ny)
    if ex > sx and ey > sy:
        out[sy - y0 : ey - y0, sx - x0 : ex - x0] = img[sy:ey, sx:ex]
    return out, True


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in): each output pixel the mean of the input pixels it covers, by overlap."""
    edges_in, edges_out = np.arange(n_in + 1) / n_in, np.arange(n_out + 1) / n_out
    lo = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    hi = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    m = np.clip(hi - lo, 0, None)
    out: np.ndarray = m / m.sum(axis=1, keepdims=True)
    return out


_AREA = _area_matrix(RUBIN_FIELD, CROP_SIZE)


def resample_area(img: np.ndarray) -> np.ndarray:
    """(RUBIN_FIELD, RUBIN_FIELD) -> (21, 21) by area; NaN pixels are left out of their means
    (NaN where an output pixel covers none)."""
    finite = np.isfinite(img)
    if finite.all():  # the common case: two small products (measured: 4 us instead of 18)
        out: np.ndarray = (_AREA @ img.astype(np.float64) @ _AREA.T).astype(np.float32)
        return out
    vals = np.where(finite, img, 0.0).astype(np.float64)
    num = _AREA @ vals @ _AREA.T
    den = _AREA @ finite.astype(np.float64) @ _AREA.T
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 1e-9, num / np.where(den > 1e-9, den, 1.0), np.nan)
    return out.astype(np.float32)


def rubin_cutout_crop(raw: bytes | None, name: str, *, fast: bool = True, max_bytes: int = MAX_STAMP_BYTES) -> tuple[np.ndarray, bool]:
    if raw is None:
        raise CutoutError(f"{name} cutout is missing", reason="cutout_missing")
    if not _within(raw, name, max_bytes).startswith(FITS_MAGIC):
        raise CutoutError(f"{name} cutout is not a FITS file", reason="cutout_bad_fits")
    header = _header_cards(raw)  # read once: the image's layout and the reference pixel
    img = _fast_fits(raw, header) if fast else None
    if img is None:
        img = _astropy_fits(raw)
    cards = header[0]
    ny, nx = img.shape
    field, padded = window(img, _source_start(cards, "CRPIX1", nx), _source_start(cards, "CRPIX2", ny), RUBIN_FIELD)
    return resample_area(field), padded


def rubin_stamp_pixels(
    science: bytes | None, difference: bytes | None, *, fast: bool = True, max_bytes: int = MAX_STAMP_BYTES
) -> StampPixels:
    """Rubin science + difference FITS -> (2, 21, 21) raw crops (6" around the source). Pure."""
    sci, pad_s = rubin_cutout_crop(science, "science", fast=fast, max_bytes=max_bytes)
    dif, pad_d = rubin_cutout_crop(difference, "difference", fast=fast, max_bytes=max_bytes)
    return _stamp(np.stack([sci, dif]), pad_s or pad_d)
