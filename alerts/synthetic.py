"""Valid ZTF-like alerts with generated cutouts, so that tests, the demo and the benchmark run on a
machine without real alerts.

    python -m alerts.synthetic --out DIR --n N      # N alerts, one .avro file each

The schema is a faithful subset of the official ztf.alert v4.02 layout (same field order, unions,
cutout record), written as one-record Avro containers like the real stream.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass

import fastavro
import numpy as np
from astropy.io import fits

from alerts.framing import ContainerFramer, zigzag

_CANDIDATE_FIELDS = [
    {"name": "jd", "type": "double"},
    {"name": "fid", "type": "int"},
    {"name": "pid", "type": "long"},
    {"name": "candid", "type": "long"},
    {"name": "isdiffpos", "type": "string"},
    {"name": "xpos", "type": ["null", "float"], "default": None},
    {"name": "ypos", "type": ["null", "float"], "default": None},
    {"name": "ra", "type": "double"},
    {"name": "dec", "type": "double"},
    {"name": "magpsf", "type": "float"},
    {"name": "sigmapsf", "type": "float"},
    {"name": "rb", "type": ["null", "float"], "default": None},
    {"name": "ssdistnr", "type": ["null", "float"], "default": None},
    {"name": "drb", "type": ["null", "float"], "default": None},
]
_PRV_FIELDS = [
    {"name": "jd", "type": "double"},
    {"name": "fid", "type": "int"},
    {"name": "pid", "type": "long"},
    {"name": "candid", "type": ["null", "long"], "default": None},
    {"name": "magpsf", "type": ["null", "float"], "default": None},
    {"name": "sigmapsf", "type": ["null", "float"], "default": None},
    {"name": "ra", "type": ["null", "double"], "default": None},
    {"name": "dec", "type": ["null", "double"], "default": None},
    {"name": "programid", "type": "int"},
]

ALERT_SCHEMA = {
    "type": "record",
    "doc": "avro alert schema for ZTF (www.ztf.caltech.edu) - test subset",
    "name": "alert",
    "namespace": "ztf",
    "version": "4.02",
    "fields": [
        {"name": "schemavsn", "type": "string"},
        {"name": "publisher", "type": "string"},
        {"name": "objectId", "type": "string"},
        {"name": "candid", "type": "long"},
        {"name": "candidate", "type": {"type": "record", "name": "candidate", "namespace": "ztf.alert", "fields": _CANDIDATE_FIELDS}},
        {
            "name": "prv_candidates",
            "type": ["null", {"type": "array", "items": {"type": "record", "name": "prv_candidate", "namespace": "ztf.alert", "fields": _PRV_FIELDS}}],
            "default": None,
        },
        {
            "name": "cutoutScience",
            "type": ["null", {"type": "record", "name": "cutout", "namespace": "ztf.alert", "fields": [
                {"name": "fileName", "type": "string"}, {"name": "stampData", "type": "bytes"}]}],
            "default": None,
        },
        {"name": "cutoutTemplate", "type": ["null", "ztf.alert.cutout"], "default": None},
        {"name": "cutoutDifference", "type": ["null", "ztf.alert.cutout"], "default": None},
    ],
}
SCHEMA_JSON = json.dumps(ALERT_SCHEMA).encode()
_PARSED = fastavro.parse_schema(ALERT_SCHEMA)
_FRAMER = ContainerFramer(SCHEMA_JSON)


def fits_gz(img: np.ndarray) -> bytes:
    """A ZTF-style cutout: gzipped single-HDU FITS of 32-bit floats."""
    buf = io.BytesIO()
    fits.PrimaryHDU(np.asarray(img, dtype=np.float32)).writeto(buf)
    return gzip.compress(buf.getvalue(), mtime=0)


def source_stamp(rng: np.random.Generator, shape: tuple[int, int] = (63, 63), kind: str = "point") -> np.ndarray:
    """Sky noise plus, by kind, a point source, an extended source, a streak or nothing."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    img = rng.normal(100.0, 5.0, size=shape)
    if kind == "point":
        img += 2000 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 1.5**2))
    elif kind == "extended":
        img += 800 * np.exp(-((yy - cy) ** 2 / 30 + (xx - cx) ** 2 / 12))
    elif kind == "streak":
        img += 1500 * np.exp(-((yy - cy) - 0.5 * (xx - cx)) ** 2 / 2.0)
    return img.astype(np.float32)


@dataclass
class GeneratedAlert:
    candid: int
    object_id: str
    message: bytes


def make_alert(
    candid: int,
    *,
    object_id: str | None = None,
    seed: int | None = None,
    shape: tuple[int, int] = (63, 63),
    nan_fraction: float = 0.0,
    n_prv: int = 3,
    kind: str = "point",
    science: bytes | None | str = "make",
    difference: bytes | None | str = "make",
    xpos: float | None = 1500.0,
    ypos: float | None = 1500.0,
    file_suffix: str = ".fits.gz",
) -> GeneratedAlert:
    """One valid alert message (unless cutouts are overridden with bad bytes or None)."""
    rng = np.random.default_rng(candid if seed is None else seed)
    object_id = object_id or f"ZTF25{candid % 10**7:07d}"[:12]
    sci_img = source_stamp(rng, shape, kind)
    dif_img = sci_img - rng.normal(100.0, 5.0, size=shape).astype(np.float32)
    if nan_fraction:
        mask = rng.random(shape) < nan_fraction
        sci_img[mask] = np.nan
        dif_img[mask] = np.nan
    def cut(b: bytes | None, name: str) -> dict[str, object] | None:
        return None if b is None else {"fileName": f"candid{candid}_{name}{file_suffix}", "stampData": b}

    sci = fits_gz(sci_img) if science == "make" else science
    dif = fits_gz(dif_img) if difference == "make" else difference
    assert not isinstance(sci, str) and not isinstance(dif, str), 'cutouts: bytes, None or "make"'
    jd = 2460000.5 + (candid % 100000) / 1000
    rec = {
        "schemavsn": "4.02",
        "publisher": "ZTF (www.ztf.caltech.edu)",
        "objectId": object_id,
        "candid": candid,
        "candidate": {
            "jd": jd, "fid": 1 + candid % 2, "pid": candid // 1000, "candid": candid, "isdiffpos": "t",
            "xpos": xpos, "ypos": ypos, "ra": float(rng.uniform(0, 360)), "dec": float(rng.uniform(-30, 90)),
            "magpsf": 18.5, "sigmapsf": 0.1, "rb": 0.9, "ssdistnr": None, "drb": 0.99,
        },  # fmt: skip
        "prv_candidates": [
            {"jd": jd - i - 1, "fid": 1, "pid": 1, "candid": None, "magpsf": 19.0, "sigmapsf": 0.1,
             "ra": None, "dec": None, "programid": 1}
            for i in range(n_prv)
        ],  # fmt: skip
        "cutoutScience": cut(sci, "sci"),
        "cutoutTemplate": cut(fits_gz(sci_img), "ref"),
        "cutoutDifference": cut(dif, "diff"),
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, _PARSED, rec)
    return GeneratedAlert(candid, object_id, _FRAMER.frame(buf.getvalue()))


def make_alerts(n: int, start: int = 2_400_000_000_000_000_000, kinds: tuple[str, ...] = ("point", "extended", "streak", "none")) -> list[GeneratedAlert]:
    return [make_alert(start + i, kind=kinds[i % len(kinds)]) for i in range(n)]


def relabelled(message: bytes, old: tuple[int, str], new: tuple[int, str]) -> bytes:
    """A one-record ZTF message with its ``candid`` (top level and ``candidate.candid``) and its
    ``objectId`` replaced, every other byte the same: a real alert made into another alert, so that
    a benchmark can replay a night of distinct alerts (bench/night.py) from the 2,134 real ones.

    Byte edits rather than a decode and re-encode: it runs for every message of a million-alert
    replay (~1 µs against ~300 µs for fastavro's writer per record), and it keeps the message
    exactly as ZTF wrote it. Each new value must take as many bytes as the old one (ValueError
    otherwise); the old candid must occur once or twice and the old objectId once as Avro values
    (ValueError otherwise, e.g. a history entry that carries the same candid). The unit tests hold
    the result to fastavro's reading of the message with the new values."""
    (old_candid, old_oid), (new_candid, new_oid) = old, new
    a, b = zigzag(old_candid), zigzag(new_candid)
    o, p = old_oid.encode(), new_oid.encode()
    o, p = zigzag(len(o)) + o, zigzag(len(p)) + p
    if len(a) != len(b) or len(o) != len(p):
        raise ValueError("the new candid and objectId must encode to as many bytes as the old ones")
    if message.count(a) not in (1, 2) or message.count(o) != 1:
        raise ValueError("candid or objectId not found exactly where a ZTF record has them")
    return message.replace(a, b).replace(o, p)


def main(argv: list[str] | None = None) -> None:
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m alerts.synthetic", description="write N generated valid alerts")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=500)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for alert in make_alerts(a.n):
        (out / f"{alert.candid}.avro").write_bytes(alert.message)
    print(f"wrote {a.n} alerts to {out}")


if __name__ == "__main__":
    main()
