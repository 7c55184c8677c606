"""Alerts from files -> Kafka messages in their survey's wire form, from Avro container files with
one or many alerts, folders of them, .tar/.tar.gz archives such as the ZTF public alert archive
nightly files, and ``.bin`` files holding one message each as the stream carried it.

ZTF: a one-record container with the writer schema. Rubin (a container whose schema is an official
``lsst.v{major}_{minor}`` alert schema): ``0x00`` + the schema id + the record (alerts/rubin_schemas.py).

Record bytes are kept as they are where the file stores one record per block (the writer schema
header text is copied verbatim too), so a replayed message is what the stream carried.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import fastavro
from fastavro import schemaless_writer

from alerts.framing import ContainerFramer

AVRO_SUFFIXES = (".avro",)
WIRE_SUFFIXES = (".bin",)  # one message per file, as on the stream
_RUBIN_NAMESPACE = re.compile(r"lsst\.v([0-9]+)_([0-9]+)")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _is_tar(name: str) -> bool:
    return name.endswith(TAR_SUFFIXES)


def messages_from_container(data: bytes) -> Iterator[bytes]:
    """One Avro container file (any codec, any number of records) -> one message per record."""
    fo = io.BytesIO(data)
    blocks = fastavro.block_reader(fo)
    schema_json = blocks.metadata["avro.schema"].encode()
    top = json.loads(schema_json)
    rubin = _RUBIN_NAMESPACE.fullmatch(str(top.get("namespace") or str(top.get("name", "")).rpartition(".")[0]))
    if rubin:
        head = b"\x00" + (int(rubin[1]) * 100 + int(rubin[2])).to_bytes(4, "big")
        def frame(record: bytes) -> bytes:
            return head + record
    else:
        frame = ContainerFramer(schema_json).frame
    parsed = fastavro.parse_schema(blocks.writer_schema)
    for block in blocks:
        if block.num_records == 1 and getattr(block, "codec", None) == "null":
            yield frame(block.bytes_.getvalue())  # type: ignore[attr-defined]  # untyped in fastavro
            continue
        for rec in block:
            buf = io.BytesIO()
            schemaless_writer(buf, parsed, rec)
            yield frame(buf.getvalue())


def _files(paths: Iterable[str | Path]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(
                f for f in p.rglob("*") if f.is_file() and (f.suffix in AVRO_SUFFIXES + WIRE_SUFFIXES or _is_tar(f.name))
            )
        else:
            yield p


def iter_messages(paths: Iterable[str | Path]) -> Iterator[bytes]:
    """Every alert of every file, folder and archive, as one Kafka message value each."""
    for path in _files(paths):
        if _is_tar(path.name):
            with tarfile.open(path, "r|*") as tar:
                for member in tar:
                    if not member.isfile() or not member.name.endswith(AVRO_SUFFIXES):
                        continue
                    f = tar.extractfile(member)
                    if f is not None:
                        yield from messages_from_container(f.read())
        elif path.suffix in WIRE_SUFFIXES:
            yield path.read_bytes()
        else:
            yield from messages_from_container(path.read_bytes())
