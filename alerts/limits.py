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
    # Avro container codecs besides null, inflated with a cap (below); null is always read.
    # deflate by default: Avro's specification requires every reader to read null and deflate
    # ("Required Codecs"), so any producer may send it, and a bomb costs one capped inflate (a
    # 62 KB block inflates to the 16 MiB cap in ~40 ms on one core, then ``too_large``). snappy
    # by default too: it is Spark's default Avro codec, so alerts re-published by a Spark job
    # (Fink's and ALeRCE's pipelines run on Spark; ../shared/ztf/edge holds such a file) arrive in
    # it, and a bomb costs nothing: a snappy block states its inflated size first, refused past
    # the cap before anything is inflated, and the decoder refuses a block that outgrows what it
    # stated (20 MiB inflate in ~20 ms where allowed). bzip2, which no alert producer is known to
    # use and which inflates ~50x slower (a capped bomb would cost ~1 s of CPU per message), only
    # where a stream is known to.
    allowed_codecs: tuple[str, ...] = ("deflate", "snappy")
    # One message's container blocks after inflating, all of them together: a container of many
    # small blocks that each inflate to just under a per-block cap would multiply it.
    max_block_bytes: int = 16 * 1024 * 1024
    # One cutout after gunzip (a 63x63 float64 stamp is ~35 KB with its header).
    max_stamp_bytes: int = 4 * 1024 * 1024
    max_object_id_chars: int = 32


SUPPORTED_CODECS = ("deflate", "snappy", "bzip2")
