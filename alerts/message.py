"""One Kafka message value -> (alert, raw stamp crops): the decode + cutout step every program
shares (the daemon, the trainer's data loader, the benchmark). Pure: no I/O, no clock."""

from __future__ import annotations

from alerts.cutouts import StampPixels, stamp_pixels
from alerts.decoder import Alert, SchemaCache, decode_alert
from alerts.errors import BadAlertError


def decode_message(value: bytes | None, schemas: SchemaCache) -> tuple[Alert, StampPixels]:
    """bytes -> (alert, raw crops); raises BadAlertError (named, with a reason) on bad input.

    The fast decoder is an exact parse (the cutouts are where the writer schema puts them), so a
    cutout that does not cut is the message's fault, not the decoder's: no second decode."""
    alert = decode_alert(value or b"", schemas)
    try:
        return alert, stamp_pixels(
            alert.science, alert.difference, alert.xpos, alert.ypos, max_bytes=schemas.limits.max_stamp_bytes
        )
    except BadAlertError as e:
        e.candid = alert.candid
        raise


def warm_up() -> None:
    """Compile (or load from numba's cache) the decoder's and the features' kernels on a synthetic
    alert, so that the first real batch does not pay for it (seconds, without a cache)."""
    from alerts.features import alert_features
    from alerts.synthetic import make_alert

    alert, _ = decode_message(make_alert(2_400_000_000_000_000_000, n_prv=2).message, SchemaCache())
    alert_features(alert)
