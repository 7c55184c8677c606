"""The one explicit allowlist of what the decoder reads from an alert, and so of what any model can
ever see. Nothing outside these tuples is decoded, and a unit test fails if a forbidden field, or
a field computed from one, enters them.

Why: the labels of ../shared/ztf were made from alert fields: asteroid from ``ssdistnr`` (distance
to a known solar-system object) and bogus from ``drb`` (the real/bogus score). A model that reads
them, or ``rb``/``ssmagnr``/``ssnamenr``/``drbversion``, learns the label, not the sky.

Chosen besides: only fields present in every ZTF schema from 1.8 to 4.02 (a field that exists only
in later schemas would tell the model the alert's age and source, not its nature); no identifiers
(pid, field, rcid, PS1 object ids, file names); no absolute time (jd, reference image dates), only
time differences. Position enters only as galactic and ecliptic latitude (features.py), and the
trainer reports an ablation without it.
"""

from __future__ import annotations

FORBIDDEN: frozenset[str] = frozenset({"ssdistnr", "ssmagnr", "ssnamenr", "rb", "drb", "drbversion", "rbversion"})

# Fields of ``candidate`` the decoder reads. The first seven also make the output record (and the
# cutout placement: xpos/ypos); jd and ra/dec enter the model only through differences and
# latitudes (features.py).
CANDIDATE_FIELDS: tuple[str, ...] = (
    "jd", "fid", "ra", "dec", "xpos", "ypos", "magpsf",
    "sigmapsf", "diffmaglim", "fwhm", "elong", "classtar", "chipsf", "scorr",
    "magap", "sigmagap", "magapbig", "sigmagapbig", "magdiff", "magfromlim", "sumrat",
    "nbad", "nneg", "seeratio", "mindtoedge", "aimage", "bimage", "aimagerat", "bimagerat",
    "distnr", "magnr", "sigmagnr", "chinr", "sharpnr",
    "ndethist", "ncovhist", "jdstarthist", "jdendhist",
    "sgscore1", "distpsnr1", "sgmag1", "srmag1", "simag1", "szmag1",
    "sgscore2", "distpsnr2", "sgscore3", "distpsnr3",
)  # fmt: skip

# String field of ``candidate`` read beside them: the sign of the difference ('t'/'1': positive).
CANDIDATE_STRINGS: tuple[str, ...] = ("isdiffpos",)

# Fields of each ``prv_candidates`` entry (the 30-day history: detections, and upper limits where
# magpsf is null).
HISTORY_FIELDS: tuple[str, ...] = ("jd", "fid", "magpsf", "sigmapsf", "diffmaglim", "isdiffpos")

# Fields of a ``prv_candidates`` detection measured at its own epoch, which also are candidate
# fields: read only by the trainer, to build an object's first-detection view from the earliest
# detection of its history (trainer/stages.py ``first_detection_view``). Every ZTF schema from 1.8
# carries all of them in ``prv_candidate``; position and time stay the alert's. A subset of
# CANDIDATE_FIELDS (plus the sign of the difference), so nothing here widens what a model can see.
EPOCH_FIELDS: tuple[str, ...] = (
    "fid", "magpsf", "sigmapsf", "diffmaglim", "fwhm", "elong", "classtar", "chipsf", "scorr",
    "magap", "sigmagap", "magapbig", "sigmagapbig", "magdiff", "magfromlim", "sumrat",
    "nbad", "nneg", "seeratio", "mindtoedge", "aimage", "bimage", "aimagerat", "bimagerat",
    "distnr", "magnr", "sigmagnr", "chinr", "sharpnr",
)  # fmt: skip

# ---- Rubin/LSST (alerts/rubin.py) ------------------------------------------------------------
# The same discipline for the survey without labels yet: whatever labels come later will be made
# the way ZTF's were, from the real/bogus score (``reliability``) and the solar-system association
# (``ssObjectId``, ``ssSource``, ``MPCORB``/``mpc_orbits``), so none of them is ever read. No
# identifiers (visit, detector, ids), no absolute time, no processing times. Only fields present in
# every schema from 8.0 on (the operations era; the real stream began with 9.0).
RUBIN_FORBIDDEN: frozenset[str] = frozenset(
    {"reliability", "ssObjectId", "ssSource", "MPCORB", "mpc_orbits", "ssObject", "timeProcessedMjdTai", "timeWithdrawnMjdTai"}
)

# Fields of ``diaSource`` the decoder reads (midpointMjdTai, ra, dec enter only as differences and
# latitudes; x/y are where the cutout was cut).
RUBIN_SOURCE_FIELDS: tuple[str, ...] = (
    "midpointMjdTai", "ra", "dec", "x", "y",
    "psfFlux", "psfFluxErr", "snr", "apFlux", "apFluxErr", "scienceFlux", "scienceFluxErr",
    "templateFlux", "templateFluxErr", "extendedness", "psfChi2", "psfNdata",
    "isDipole", "isNegative", "dipoleMeanFlux", "dipoleFluxDiff", "dipoleLength", "dipoleChi2",
    "trailLength", "trailFlux", "ixx", "iyy", "ixy", "ixxPSF", "iyyPSF", "ixyPSF",
    "pixelFlags_saturatedCenter", "pixelFlags_crCenter", "pixelFlags_edge",
)  # fmt: skip
RUBIN_SOURCE_STRINGS: tuple[str, ...] = ("band",)
# Fields of ``diaObject`` (null for a source without an object).
RUBIN_OBJECT_FIELDS: tuple[str, ...] = ("firstDiaSourceMjdTai", "nDiaSources")
# Fields of each ``prvDiaSources`` entry (Rubin's history: earlier detections of the object).
RUBIN_HISTORY_FIELDS: tuple[str, ...] = ("midpointMjdTai", "band", "psfFlux", "psfFluxErr")
