"""Earlier views of a labelled alert: the alert as it would have looked when its object had been
detected only k times. Why: the labelled set's SN, AGN and VS alerts all come from objects seen
many times (median ndethist 80 to 630: catalogues and spectroscopic classifications come after
several detections), while its asteroids and bogus alerts are first detections. Cross-validation
on the alerts as they are therefore cannot show how the classifier treats the first alerts of a
new object, the ones a broker most wants classified; the trainer's table reports the classifier
on these views as well (``trainer.comparison.cross_validate``), so every run says from which
detection on its classes can be trusted.

What a view changes (pure, on the decoded alert): earlier detections of the 30-day history beyond
the k - 1 most recent become upper limits at their own limiting magnitude (had the object not yet
been there, those epochs would have been non-detections), ``ndethist`` becomes k and
``jdstarthist`` the first kept detection. What it keeps: the alert's own measurements and stamps,
the reference and PS1 neighbours (the sky under the object does not change), ``ncovhist`` (how
often ZTF looked there). An approximation of the object's earlier alerts, not a copy of them:
their stamps are not in the packet.

The first-detection view goes one step further (``first_detection_view``): where the 30-day
history holds an earlier detection, the view takes the measurements of the earliest one (its own
magnitude, shape, PSF fit and reference-source fields, from the packet's ``prv_candidates``), so
the object is seen as it was when the window first caught it, not at its latest and often
brightest epoch; ``earliest_detection_alert`` gives that detection as an alert of its own time,
with the little history the packet held before it. Why: early trees fitted on views that keep the
alert's own measurements score 79.5 % macro-F1 on such views but 72.7 % on the earliest
detections as alerts of their own time, and trees fitted on the latter 72.9 % on the former; a
new supernova's first alert is young, like the earlier epoch (docs/model-experiments.md, "The
first-detection view reads the earliest detection").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from alerts.alert import Alert, History
from alerts.allowlist import CANDIDATE_FIELDS, EPOCH_FIELDS
from alerts.decoder import epoch_values
from alerts.features import HISTORY_WINDOW_DAYS, history_mask

# Detections so far at which the classifier is evaluated (report table and figure).
STAGES: tuple[int, ...] = (1, 2, 3, 5, 10)

_NDETHIST = CANDIDATE_FIELDS.index("ndethist")
_JDSTARTHIST = CANDIDATE_FIELDS.index("jdstarthist")
_JD = CANDIDATE_FIELDS.index("jd")
_JDENDHIST = CANDIDATE_FIELDS.index("jdendhist")
_EPOCH_INDEX = [CANDIDATE_FIELDS.index(n) for n in EPOCH_FIELDS]


def earlier_view(alert: Alert, detections: int) -> Alert:
    """``alert`` as if its object had been detected ``detections`` times in all (this alert
    included). An alert whose object has no more detections than that (``ndethist``) is returned
    as it is."""
    if detections < 1:
        raise ValueError("a view needs at least one detection: the alert itself")
    ndethist = alert.value("ndethist")
    if not np.isnan(ndethist) and ndethist <= detections:
        return alert
    h = alert.history
    earlier = np.flatnonzero(~np.isnan(h.magpsf) & (h.jd < alert.jd))
    newest_first = earlier[np.argsort(-h.jd[earlier], kind="stable")]
    kept, dropped = newest_first[: detections - 1], newest_first[detections - 1 :]
    magpsf, sigmapsf, positive = h.magpsf.copy(), h.sigmapsf.copy(), h.positive.copy()
    magpsf[dropped], sigmapsf[dropped], positive[dropped] = np.nan, np.nan, -1
    candidate = alert.candidate.copy()
    candidate[_NDETHIST] = detections
    if len(kept) == detections - 1:  # the object's first detection is now in the window (or is this alert)
        candidate[_JDSTARTHIST] = h.jd[kept].min() if len(kept) else alert.jd
    history = History(h.jd, h.fid, magpsf, sigmapsf, h.diffmaglim, positive)
    return dataclasses.replace(alert, candidate=candidate, history=history)


def _earliest_detection(alert: Alert, prv_candidates: Sequence[dict[str, Any]] | None) -> tuple[float, dict[str, Any]] | None:
    """(jd, ``prv_candidates`` entry) of the earliest detection in the alert's 30-day window (the
    entries ``alert.history`` was decoded from, in their order), or None."""
    h = alert.history
    if not prv_candidates or len(prv_candidates) != len(h):
        return None
    detections = np.flatnonzero(history_mask(h.jd, alert.jd, HISTORY_WINDOW_DAYS) & ~np.isnan(h.magpsf))
    if len(detections) == 0:
        return None
    i = int(detections[np.argmin(h.jd[detections])])
    return float(h.jd[i]), prv_candidates[i]


def _with_epoch(view: Alert, entry: dict[str, Any]) -> Alert:
    candidate = view.candidate.copy()
    candidate[_EPOCH_INDEX], isdiffpos = epoch_values(entry)
    return dataclasses.replace(view, candidate=candidate, isdiffpos=isdiffpos)


def first_detection_view(alert: Alert, prv_candidates: Sequence[dict[str, Any]] | None) -> Alert:
    """``earlier_view(alert, 1)`` with the measurements of the earliest detection of the alert's
    30-day history (``prv_candidates``, the packet's own entries, in the order ``alert.history``
    was decoded from): the ``EPOCH_FIELDS`` and the sign of the difference become that epoch's.
    Time, position, the PS1 neighbours, the stamps and the history of upper limits (the field's
    cadence over the window) stay those of ``earlier_view``. An alert with no earlier detection in
    its window, or no history to read, gets ``earlier_view(alert, 1)`` itself."""
    view = earlier_view(alert, 1)
    found = None if view is alert else _earliest_detection(alert, prv_candidates)
    return view if found is None else _with_epoch(view, found[1])


def earliest_detection_alert(alert: Alert, prv_candidates: Sequence[dict[str, Any]] | None) -> Alert | None:
    """The earliest detection of the alert's 30-day history as an alert of its own time: its
    ``EPOCH_FIELDS``, sign and ``jd``, seen once (``ndethist`` 1, the history's start and end its
    ``jd``), with only the entries before it as history (upper limits; the window seldom holds
    any, so this is a first alert with little or no history, as archival copies and new fields
    give). None where the window holds no earlier detection. The trainer's early trees learn from
    it beside ``first_detection_view``, which carries the window's upper limits instead: early trees
    fitted on one kind of first detection alone score up to 9 points lower on another
    (docs/model.md)."""
    found = _earliest_detection(alert, prv_candidates)
    if found is None:
        return None
    jd, entry = found
    h = alert.history
    before = h.jd < jd
    history = History(h.jd[before], h.fid[before], np.full(int(before.sum()), np.nan), np.full(int(before.sum()), np.nan),
                      h.diffmaglim[before], np.full(int(before.sum()), -1, np.int8))  # fmt: skip
    candidate = alert.candidate.copy()
    candidate[_JD] = jd
    candidate[_NDETHIST], candidate[_JDSTARTHIST], candidate[_JDENDHIST] = 1.0, jd, jd
    return _with_epoch(dataclasses.replace(alert, candidate=candidate, history=history), entry)


# The candidate fields of ALeRCE's stamp classifier (Carrasco-Davis et al. 2021), the anchor of
# issue #10: what a first alert rebuilt from its rows or from a broker export like it carries,
# besides the stamps and the sign of the difference. ``rb``, which those rows also keep, is never
# read (alerts/allowlist.py).
ALERCE_STAMP_FIELDS: frozenset[str] = frozenset({
    "jd", "fid", "ra", "dec", "xpos", "ypos", "magpsf", "sigmapsf", "diffmaglim", "fwhm", "classtar",
    "distnr", "magnr", "chinr", "sharpnr", "ndethist", "ncovhist",
    "sgscore1", "distpsnr1", "sgscore2", "distpsnr2", "sgscore3", "distpsnr3",
})  # fmt: skip
_NOT_EXPORTED = np.array([n not in ALERCE_STAMP_FIELDS for n in CANDIDATE_FIELDS])


def exported_first_alert(alert: Alert) -> Alert:
    """``alert`` as a first alert rebuilt from an export that keeps only ``ALERCE_STAMP_FIELDS``:
    no history, seen once (``ndethist`` 1), every other candidate field null. The trainer fits
    the head's export trees on these views of its training alerts and of their earliest
    detections (trainer/classify.py ``fit_trees``): trees fitted on ZTF's full packets, even
    with nulls drawn at random, score such a packet ~5 points lower (docs/model-experiments.md,
    "Packets rebuilt from an export")."""
    candidate = alert.candidate.copy()
    candidate[_NDETHIST], candidate[_JDSTARTHIST], candidate[_JDENDHIST] = 1.0, alert.jd, alert.jd
    candidate[_NOT_EXPORTED] = np.nan
    return dataclasses.replace(alert, candidate=candidate, history=History.empty())
