"""Earlier views of a labelled alert: the alert as it would have looked when its object had been
detected only k times. Why: the labelled set's SN, AGN and VS alerts all come from objects seen
many times (median ndethist 80 to 630: catalogues and spectroscopic classifications come after
several detections), while its asteroids and bogus alerts are first detections. Cross-validation
on the alerts as they are therefore cannot show how the classifier treats the first alerts of a
new object, the ones a broker most wants classified; the trainer's table reports the classifier
on these views as well (``trainer.classify.cross_validate``), so every run says from which
detection on its classes can be trusted.

What a view changes (pure, on the decoded alert): earlier detections of the 30-day history beyond
the k - 1 most recent become upper limits at their own limiting magnitude (had the object not yet
been there, those epochs would have been non-detections), ``ndethist`` becomes k and
``jdstarthist`` the first kept detection. What it keeps: the alert's own measurements and stamps,
the reference and PS1 neighbours (the sky under the object does not change), ``ncovhist`` (how
often ZTF looked there). An approximation of the object's earlier alerts, not a copy of them:
their own candidate fields and stamps are not in the packet.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from alerts.alert import Alert, History
from alerts.allowlist import CANDIDATE_FIELDS

# Detections so far at which the classifier is evaluated (report table and figure).
STAGES: tuple[int, ...] = (1, 2, 3, 5, 10)

_NDETHIST = CANDIDATE_FIELDS.index("ndethist")
_JDSTARTHIST = CANDIDATE_FIELDS.index("jdstarthist")


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
