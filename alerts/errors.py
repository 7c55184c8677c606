"""Named errors for bad input. Every one carries a short machine-readable ``reason`` that becomes
the dead-letter header and the label of the ``dead_letters_total`` counter."""

from __future__ import annotations


class BadAlertError(Exception):
    """An input message that cannot become a result. Never stops the stream: it is dead-lettered."""

    reason: str = "bad_alert"

    def __init__(self, message: str, *, reason: str | None = None, candid: int | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.candid = candid


class AlertDecodeError(BadAlertError):
    """The bytes are not a readable ZTF alert (not Avro, truncated, unknown schema, missing fields)."""

    reason = "decode"


class CutoutError(BadAlertError):
    """The alert decoded but a science/difference cutout is missing, not gzip, or not a usable image."""

    reason = "cutout"
