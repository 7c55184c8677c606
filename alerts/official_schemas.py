"""The official ZTF alert schemas, by fingerprint: SHA-256 of the Avro parsing canonical form of
each version of ZwickyTransientFacility/ztf-avro-alert (1.8 to 4.02; 4.01 and 4.02 differ only in
docs, so they share one). A writer schema with one of these fingerprints passes the schema policy
at once; any other is judged by its rules (schema_policy.py). Every writer schema of the real
corpus matches one (tests)."""

from __future__ import annotations

import hashlib
from typing import Any

from fastavro.schema import to_parsing_canonical_form

OFFICIAL_FINGERPRINTS: dict[str, str] = {
    "6ac12491df763c9577cd2bfb140ff261dff2b71595bbbe86ceb6b45256ccf6f9": "1.8",
    "bcaf63da6165eb9ef54391399b928f8ca5dc674ce509778266d54faf5e7e5052": "3.0",
    "77c45bb5788e6c719b430a6b5de285c8a24cf8638f97eb626cea5f103031303d": "3.1",
    "42460973aa3610bd8e274e7298f30c2145a9b98c3bef3c6b264a20db3306a441": "3.2",
    "09b312a2dadfafcf684b816502cb0f505997175fc2df4ed64273d75d4ac75f61": "3.3",
    "2e3ca42a7603e5b42987c5d43503a9ec8b3ed803c54ad0a42d7d9101d7d9d32b": "4.01/4.02",
}


def fingerprint(schema: Any) -> str | None:
    """SHA-256 of the parsing canonical form, or None for a schema that has none (invalid)."""
    try:
        return hashlib.sha256(to_parsing_canonical_form(schema).encode()).hexdigest()
    except Exception:
        return None


def official_version(schema: Any) -> str | None:
    fp = fingerprint(schema)
    return None if fp is None else OFFICIAL_FINGERPRINTS.get(fp)
