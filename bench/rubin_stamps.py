"""The measurement behind Rubin's model input: a 21x21 crop of native pixels (0.2", 4.2" across),
the whole cutout resampled to 21x21, or ZTF's field (21" across, resampled to 1"/pixel)?

    python bench/rubin_stamps.py [--rubin ../shared/rubin/wire] [--ztf ../shared/ztf/alerts]

Prints, from one run: how many cutouts allow each choice (ZTF's field needs >= 105 native
pixels), the PSF's FWHM in input pixels under each choice (from the PSFIMAGE extension, second
moments) beside ZTF's (its ``fwhm`` field, pixels of 1"), and the share of a point source's flux
(the PSF image's) inside each window. Without ../shared it runs on generated alerts (the figures
then say nothing about the sky). Result and decision: docs/rubin.md.
"""

from __future__ import annotations

import argparse
import io
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alerts.cutouts import RUBIN_FIELD, window  # noqa: E402
from alerts.files import iter_messages  # noqa: E402
from alerts.rubin import RubinSchemaCache, decode_rubin  # noqa: E402

ZTF_FIELD_ARCSEC = 21.0
RUBIN_PIXEL_ARCSEC = 0.2


def psf_fwhm_pixels(psf: np.ndarray) -> float:
    """FWHM of a PSF image from its second moments (Gaussian: 2.355 sigma), in its pixels."""
    p = np.clip(np.nan_to_num(psf), 0, None)
    total = p.sum()
    if total <= 0:
        return float("nan")
    yy, xx = np.indices(p.shape)
    cx, cy = (p * xx).sum() / total, (p * yy).sum() / total
    var = ((p * ((xx - cx) ** 2 + (yy - cy) ** 2)).sum() / total) / 2
    return float(2.3548 * np.sqrt(var))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rubin", default=str(ROOT.parent / "shared" / "rubin" / "wire"))
    ap.add_argument("--ztf", default=str(ROOT.parent / "shared" / "ztf" / "alerts"))
    a = ap.parse_args()
    from astropy.io import fits

    if Path(a.rubin).is_dir():
        messages = list(iter_messages([a.rubin]))
        source = a.rubin
    else:
        from alerts.synthetic_rubin import make_rubin_message

        messages = [make_rubin_message(1000, 1 + i, seed=i) for i in range(50)]
        source = "generated alerts"
    cache = RubinSchemaCache()
    sizes, fwhm, inside, inside_field = [], [], [], []
    for m in messages:
        alert = decode_rubin(m, cache)
        assert alert.science is not None and alert.difference is not None
        with warnings.catch_warnings(), fits.open(io.BytesIO(alert.difference)) as hdul:
            warnings.simplefilter("ignore")
            diff = np.asarray(hdul[0].data, dtype=np.float64)
            psf = hdul["PSFIMAGE"].data if "PSFIMAGE" in hdul else None
        sizes.append(min(diff.shape))
        if psf is not None:
            fwhm.append(psf_fwhm_pixels(np.asarray(psf)))
        if psf is not None:  # a point source's flux inside each window: the PSF image's, centred
            p = np.clip(np.nan_to_num(np.asarray(psf, dtype=np.float64)), 0, None)
            ny, nx = p.shape
            for size, out in ((21, inside), (RUBIN_FIELD, inside_field)):
                part, _ = window(p, (nx - size) // 2, (ny - size) // 2, size)
                out.append(float(np.nansum(part) / p.sum()) if p.sum() > 0 else np.nan)
    sizes_a, fwhm_a, inside_a = np.array(sizes), np.array(fwhm), np.array(inside)
    need = int(np.ceil(ZTF_FIELD_ARCSEC / RUBIN_PIXEL_ARCSEC))
    scale = 1.0 / RUBIN_PIXEL_ARCSEC  # native pixels per ZTF pixel
    print(f"Rubin cutouts: {len(sizes_a)} ({source}); side in pixels: min {sizes_a.min()}, median "
          f"{np.median(sizes_a):.0f}, max {sizes_a.max()}")  # fmt: skip
    print("| input | field | cutouts that allow it | PSF FWHM in input pixels (median, IQR) |")
    print("|---|---|---|---|")
    q = np.nanpercentile(fwhm_a, [25, 50, 75]) if len(fwhm_a) else np.full(3, np.nan)
    print(f"| native 21x21 crop (0.2\"/px) | 4.2\" | {np.mean(sizes_a >= 21):.0%} | {q[1]:.2f} ({q[0]:.2f}-{q[2]:.2f}) |")
    per_px = np.nanmedian(fwhm_a * 21.0 / sizes_a[: len(fwhm_a)]) if len(fwhm_a) else np.nan
    print(f"| whole cutout resampled to 21x21 (scale varies) | {np.median(sizes_a) * RUBIN_PIXEL_ARCSEC:.1f}\" (median) "
          f"| 100% | {per_px:.2f} |")  # fmt: skip
    rq = q * 21.0 / RUBIN_FIELD
    print(f"| **centre {RUBIN_FIELD}x{RUBIN_FIELD} resampled to 21x21 (chosen)** | {RUBIN_FIELD * RUBIN_PIXEL_ARCSEC:.0f}\" "
          f"| {np.mean(sizes_a >= RUBIN_FIELD):.0%} | {rq[1]:.2f} ({rq[0]:.2f}-{rq[2]:.2f}) |")  # fmt: skip
    print(f"| ZTF's field, resampled to 1\"/px | 21\" | {np.mean(sizes_a >= need):.0%} (needs >= {need} px) | "
          f"{q[1] / scale:.2f} ({q[0] / scale:.2f}-{q[2] / scale:.2f}) |")  # fmt: skip
    ztf_dir = Path(a.ztf)
    if ztf_dir.is_dir():
        from alerts.decoder import SchemaCache, decode_alert

        zc = SchemaCache()
        zf = [decode_alert(m, zc).value("fwhm") for m in iter_messages([ztf_dir])]
        zq = np.nanpercentile(np.array(zf), [25, 50, 75])
        print(f"| ZTF (reference: its own 21x21 crop, 1\"/px) | 21\" | - | {zq[1]:.2f} ({zq[0]:.2f}-{zq[2]:.2f}) |")
    print(f"share of a point source's flux (the PSF image's) inside the native 21x21 crop: median "
          f"{np.nanmedian(inside_a):.0%}; inside the centre {RUBIN_FIELD}x{RUBIN_FIELD}: {np.nanmedian(inside_field):.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
