"""One verdict per bone and per run: ``ok``, ``review`` or ``failed``, with the reasons in plain words.

Per bone found:

``ok``
    Its size and place fit the bone (it would not have been named
    otherwise), the network is as sure of it as of bones it had never seen
    in the held-out folds, and the scan looks like the training data.
``review``
    Named, but the network is less sure of it than of any held-out bone, or
    the three projections disagree along its surface more than held out, or
    the scan differs from the training data (input check), or the bone it is
    told apart by was not found (:data:`PLACED_AGAINST`: a lone bone's name
    rests on its shape alone): look at it before using it.
``failed``
    Named, but the network is unsure of most of it: not a result.

A bone that is not in the output is ``missing``, with why (nothing found
where it should be, or components rejected as not that bone by size or
place, see :mod:`~KneeBoneSegLib.trust.plausibility`).

The run is ``ok`` when all three bones are ``ok``, ``failed`` when no bone
is ``ok`` or ``review`` (the command line then exits with
:data:`~KneeBoneSegLib.cli.EXIT_NO_BONE`), and ``review`` otherwise.
"""

from __future__ import annotations

from ..anatomy import BONES

OK, REVIEW, FAILED, MISSING = "ok", "review", "failed", "missing"
PASSING = (OK, REVIEW)

#: The bone each one is told apart by: a femur is the bone above the tibia, a tibia the one below the
#: femur, and a patella lies in front of the femur. Found without it, a bone's name rests on its own
#: shape alone (``components.name_components``), so it is never ``ok``.
PLACED_AGAINST = {"femur": "tibia", "tibia": "femur", "patella": "femur"}


def judge(report: dict, thresholds: dict | None = None) -> dict:
    """Verdicts of a run from its report.

    Parameters
    ----------
    report : dict
        The pipeline's report: ``bones`` (found), ``components`` (with
        ``rejected``), and where the network ran ``confidence`` (per bone,
        :func:`~KneeBoneSegLib.trust.confidence.bone_confidence`) and ``input_check``.
    thresholds : dict, optional
        The model card's ``confidence``: ``min_sure_share``,
        ``max_surface_disagreement`` (below / above them: ``review``) and
        ``failed_sure_share`` (below it: ``failed``). Without them the
        network's confidence is reported but not judged.

    Returns
    -------
    dict
        ``{"run": verdict, "reasons": [...], "bones": {key: {"verdict", "reasons"}}}``.
    """
    confidence = report.get("confidence")
    differences = (report.get("input_check") or {}).get("differences", [])
    rejected = (report.get("components") or {}).get("rejected", [])
    bones = {}
    for bone in BONES:
        if bone.key not in report.get("bones", {}):
            why = f"not found: no component of a {bone.key}'s size where a {bone.key} lies"
            if rejected:
                why += f" ({len(rejected)} component{'s' if len(rejected) > 1 else ''} rejected as not a bone by size or place)"
            bones[bone.key] = {"verdict": MISSING, "reasons": [why]}
            continue
        verdict, reasons = OK, []
        if confidence is not None and thresholds:
            verdict, reasons = _judge_confidence(confidence.get(bone.key, {}), thresholds)
        if differences:
            reasons.append("the scan differs from what the model was trained on: " + "; ".join(differences))
            verdict = FAILED if verdict == FAILED else REVIEW
        neighbour = PLACED_AGAINST.get(bone.key)
        if neighbour and neighbour not in report.get("bones", {}):
            reasons.append(
                f"name uncertain: its place could not be checked against the {neighbour}, which was not found, so it may be another bone"
            )
            verdict = FAILED if verdict == FAILED else REVIEW
        bones[bone.key] = {"verdict": verdict, "reasons": reasons}

    verdicts = [entry["verdict"] for entry in bones.values()]
    run_reasons = [
        f"{key} {entry['verdict']}: {entry['reasons'][0]}" for key, entry in bones.items() if entry["verdict"] != OK
    ]
    if differences:
        run_reasons.append("the scan differs from what the model was trained on: " + "; ".join(differences))
    if confidence is None:
        run_reasons.append("the network's confidence was not measured (no network output)")
    elif not thresholds:
        run_reasons.append("the model's card has no calibrated confidence thresholds; confidence was not judged")
    if not any(v in PASSING for v in verdicts):
        run = FAILED
        run_reasons.insert(0, "no bone passed: the outputs are kept for inspection only")
    else:
        run = OK if all(v == OK for v in verdicts) else REVIEW
    return {"run": run, "reasons": run_reasons, "bones": bones}


def _judge_confidence(measured: dict, thresholds: dict) -> tuple[str, list[str]]:
    """Verdict and reasons of one bone from its ``sure_share`` and ``surface_disagreement``."""
    verdict, reasons = OK, []
    sure = measured.get("sure_share", 0.0)
    if sure < thresholds["min_sure_share"]:
        verdict = FAILED if sure < thresholds["failed_sure_share"] else REVIEW
        reasons.append(
            f"the network is sure (probability >= 0.9) of only {100 * sure:.0f} % of it "
            f"(at least {100 * thresholds['min_sure_share']:.0f} % on bones it had not seen in training)"
        )
    disagreement = measured.get("surface_disagreement")
    limit = thresholds.get("max_surface_disagreement")  # None: calibrated on one projection, where there is none
    if disagreement is not None and limit is not None and disagreement > limit:
        verdict = FAILED if verdict == FAILED else REVIEW
        reasons.append(
            f"the three projections disagree along its surface (mean {disagreement:.2f}, "
            f"at most {limit:.2f} on bones it had not seen in training)"
        )
    return verdict, reasons


def verdict_line(verdict: dict) -> str:
    """The verdict in one line: the run's, then each bone's with its first reason."""
    parts = []
    for key, entry in verdict["bones"].items():
        parts.append(key + " " + entry["verdict"] + (f" ({entry['reasons'][0]})" if entry["reasons"] else ""))
    return f"{verdict['run'].upper()}: " + "; ".join(parts)
