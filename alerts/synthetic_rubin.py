"""Valid Rubin alerts of any packaged schema version (8.0 and later), in the wire form, with
generated cutouts written as Rubin writes them (CCDData-like FITS: image, UNCERT, PSFIMAGE), so
that tests and the benchmark run without ../shared/rubin and on schemas (11.x) that no real alert
of the corpus has.

    python -m alerts.synthetic_rubin --out DIR --n N [--schema-id 1100]   # N .bin files

Every field is filled from its schema type (a non-null value where the field is not a union, a
seeded choice of null or a value where it is), then the fields the service reads get plausible
values.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from fastavro import parse_schema, schemaless_writer

from alerts.rubin_schemas import packaged_schema

BANDS = "ugrizy"


def _value(t: Any, rng: np.random.Generator, named: dict[str, Any], depth: int = 0) -> Any:
    if isinstance(t, list):
        branches = [b for b in t if b != "null"]
        if "null" in t and (not branches or rng.random() < 0.3):
            return None
        return _value(branches[0], rng, named, depth + 1)
    if isinstance(t, str):
        if t in named:
            return _value(named[t], rng, named, depth + 1)
        makers: dict[str, Callable[[], Any]] = {
            "long": lambda: int(rng.integers(1, 2**40)), "int": lambda: int(rng.integers(1, 1000)),
            "double": lambda: float(rng.normal()), "float": lambda: float(rng.normal()),
            "boolean": lambda: bool(rng.random() < 0.5), "string": lambda: "x", "bytes": lambda: b"",
            "null": lambda: None,
        }  # fmt: skip
        return makers[t]()
    if isinstance(t, dict):
        kind = t.get("type")
        if kind == "record":
            named[t["name"]] = t
            named[t["name"].rsplit(".", 1)[-1]] = t
            if t.get("namespace"):
                named[f"{t['namespace']}.{t['name']}"] = t
            return {f["name"]: _value(f["type"], rng, named, depth + 1) for f in t["fields"]}
        if kind == "array":
            return [] if depth > 3 else [_value(t["items"], rng, named, depth + 1) for _ in range(int(rng.integers(0, 3)))]
        if kind == "enum":
            return t["symbols"][0]
        if isinstance(kind, str | list | dict):
            return _value(kind, rng, named, depth + 1)
    raise ValueError(f"unsupported schema type {t!r}")


def cutout_fits(pixels: np.ndarray, crpix: tuple[float, float]) -> bytes:
    """A cutout as Rubin writes it: float32 image (nJy), UNCERT, PSFIMAGE; the source at CRPIX."""
    hdr = fits.Header()
    hdr["CRPIX1"], hdr["CRPIX2"] = crpix
    hdr["BUNIT"] = "nJy"
    psf = np.exp(-((np.arange(41) - 20.0) ** 2)[:, None] / 8 - ((np.arange(41) - 20.0) ** 2)[None, :] / 8)
    hdul = fits.HDUList([
        fits.PrimaryHDU(pixels.astype(np.float32), header=hdr),
        fits.ImageHDU(np.full_like(pixels, 25.0, dtype=np.float32), name="UNCERT"),
        fits.ImageHDU(psf, name="PSFIMAGE"),
    ])  # fmt: skip
    buf = io.BytesIO()
    hdul.writeto(buf)
    return buf.getvalue()


def make_rubin_record(schema: dict[str, Any], dia_source_id: int, rng: np.random.Generator, n_prv: int = 5,
                      size: int = 30) -> dict[str, Any]:  # fmt: skip
    """One alert record of ``schema`` (inlined JSON) with a point source in the difference stamp."""
    rec: dict[str, Any] = _value(schema, rng, {})
    mjd = 61000.0 + float(rng.uniform(0, 100))
    ra, dec = float(rng.uniform(0, 360)), float(rng.uniform(-80, 10))
    object_id = int(rng.integers(1, 2**50))
    band = BANDS[int(rng.integers(0, 6))]

    def source(i: int, t: float, b: str) -> dict[str, Any]:
        s = dict(rec["diaSource"])
        s.update(diaSourceId=i, diaObjectId=object_id, midpointMjdTai=t, ra=ra, dec=dec, band=b,
                 psfFlux=float(rng.normal(5000, 500)), psfFluxErr=300.0, x=1000.0, y=1000.0)  # fmt: skip
        return s

    rec["diaSourceId"] = dia_source_id
    rec["diaSource"] = source(dia_source_id, mjd, band)
    rec["prvDiaSources"] = [source(dia_source_id - k - 1, mjd - 3.0 * (k + 1), BANDS[k % 6]) for k in range(n_prv)]
    if isinstance(rec.get("diaObject"), dict):
        rec["diaObject"].update(diaObjectId=object_id, firstDiaSourceMjdTai=mjd - 3.0 * n_prv)
    yy, xx = np.mgrid[0:size, 0:size]
    c = size / 2.0
    star = 4000.0 * np.exp(-((xx - c + 0.5) ** 2 + (yy - c + 0.5) ** 2) / 8.0)
    noise = rng.normal(0, 25, (3, size, size))
    rec["cutoutScience"] = cutout_fits(200.0 + star + noise[0], (c + 0.5, c + 0.5))
    rec["cutoutDifference"] = cutout_fits(star + noise[1], (c + 0.5, c + 0.5))
    rec["cutoutTemplate"] = cutout_fits(200.0 + noise[2], (c + 0.5, c + 0.5))
    return rec


def make_rubin_message(schema_id: int, dia_source_id: int, seed: int = 0, n_prv: int = 5) -> bytes:
    """One wire message (0x00 + id + body) of the packaged schema ``schema_id``."""
    raw = packaged_schema(schema_id)
    if raw is None:
        raise ValueError(f"no packaged Rubin schema {schema_id} (is lsst-alert-packet installed?)")
    schema = json.loads(raw)
    rec = make_rubin_record(schema, dia_source_id, np.random.default_rng(seed), n_prv)
    buf = io.BytesIO()
    schemaless_writer(buf, parse_schema(schema), rec)
    return b"\x00" + schema_id.to_bytes(4, "big") + buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--schema-id", type=int, default=1100)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(a.n):
        (out / f"lsst_{a.schema_id}_{i}.bin").write_bytes(make_rubin_message(a.schema_id, 3_000_000_000 + i, seed=i))
    print(f"{a.n} Rubin alerts (schema id {a.schema_id}) in {out}")


if __name__ == "__main__":
    main()
