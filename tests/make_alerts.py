"""`python -m tests.make_alerts --out DIR --n N`: write N generated valid alerts (one .avro each)
for a demo on a machine without ../shared."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from alertgen import make_alerts  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=500)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for alert in make_alerts(a.n):
        (out / f"{alert.candid}.avro").write_bytes(alert.message)
    print(f"wrote {a.n} alerts to {out}")


if __name__ == "__main__":
    main()
