"""One Kafka message value -> (alert, raw stamp crops): the decode + cutout step every program
shares (the daemon, the trainer's data loader, the benchmark). Pure: no I/O, no clock.

The survey is told by the message's framing, per message, so one topic may carry both: a ZTF
alert is an Avro object container (``Obj\\x01``), a Rubin alert the schema-registry wire form
(``0x00`` + schema id + schemaless body)."""

from __future__ import annotations

import numpy as np

from alerts.cutouts import StampPixels, rubin_stamp_pixels, stamp_pixels
from alerts.decoder import Alert, SchemaCache, decode_alert
from alerts.errors import AlertDecodeError, BadAlertError
from alerts.features import alert_features
from alerts.framing import MAGIC
from alerts.rubin import RubinAlert, RubinSchemaCache, decode_rubin
from alerts.rubin_features import rubin_features
from alerts.rubin_schemas import WIRE_MAGIC

AnyAlert = Alert | RubinAlert


def decode_message(value: bytes | None, schemas: SchemaCache) -> tuple[Alert, StampPixels]:
    """ZTF bytes -> (alert, raw crops); raises BadAlertError (named, with a reason) on bad input.

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


def decode_rubin_message(value: bytes, schemas: RubinSchemaCache) -> tuple[RubinAlert, StampPixels]:
    alert = decode_rubin(value, schemas)
    try:
        return alert, rubin_stamp_pixels(alert.science, alert.difference, max_bytes=schemas.limits.max_stamp_bytes)
    except BadAlertError as e:
        e.candid = alert.candid
        raise


_RUBIN_MAGIC = bytes([WIRE_MAGIC])


def is_rubin(value: bytes | None) -> bool:
    """Whether a message is in Rubin's wire form (0x00 + schema id + body), by its first byte."""
    return value is not None and value[:1] == _RUBIN_MAGIC


def decode_any(value: bytes | None, ztf: SchemaCache, rubin: RubinSchemaCache) -> tuple[AnyAlert, StampPixels]:
    """A message of either survey, told by its first bytes -> (alert, raw crops)."""
    value = value or b""
    if is_rubin(value):
        return decode_rubin_message(value, rubin)
    if value[:4] == MAGIC or not value:
        return decode_message(value, ztf)
    raise AlertDecodeError("neither an Avro container (ZTF) nor the 0x00 wire form (Rubin)", reason="not_avro")


def features_of(alert: AnyAlert) -> np.ndarray:
    """The survey's features (alerts/features.py, alerts/rubin_features.py)."""
    return rubin_features(alert) if isinstance(alert, RubinAlert) else alert_features(alert)


def warm_up() -> None:
    """Compile (or load from numba's cache) the decoder's and the features' kernels on a synthetic
    alert, so that the first real batch does not pay for it (seconds, without a cache)."""
    from alerts.synthetic import make_alert

    alert, _ = decode_message(make_alert(2_400_000_000_000_000_000, n_prv=2).message, SchemaCache())
    alert_features(alert)
