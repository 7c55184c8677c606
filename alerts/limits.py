"""The configured bounds of decoding: every message may be hostile, so every size, depth, count and
inflate has a limit, and a message past one is a named error (a dead letter), never a crash, a
hang or a memory bomb. The consumer's config embeds this as its ``decoding`` section."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeLimits:
    # A ZTF writer schema is ~23 KB with 4 levels of nesting.
    max_schema_bytes: int = 256 * 1024
    max_schema_depth: int = 32
    # Parsed schemas kept, by the bytes of their JSON (a stream carries a handful).
    max_schema_cache_bytes: int = 8 * 1024 * 1024
    max_schema_cache_entries: int = 64
    # History entries per array (ZTF sends at most a few hundred; Rubin more).
    max_array_items: int = 10_000
    # Avro container codecs besides null, each inflated with a cap (below); null is always read.
    # Off by default: a compressed block is a memory bomb until proven otherwise.
    allowed_codecs: tuple[str, ...] = ()
    max_block_bytes: int = 16 * 1024 * 1024  # a container block after inflating
    # One cutout after gunzip (a 63x63 float64 stamp is ~35 KB with its header).
    max_stamp_bytes: int = 4 * 1024 * 1024
    max_object_id_chars: int = 32


SUPPORTED_CODECS = ("deflate", "snappy", "bzip2")
