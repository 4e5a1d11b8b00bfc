"""Scores of a run from its per-image verdicts.

Each image result is a dict with ``tag``, ``category``, ``status`` (``ok``, ``failed`` or ``unscored``) and, when
``ok``, ``verdict``: ``{"correct": bool, ...}`` (checklist, GenEval detector) or ``{"ff", "ip", "aq", ...}``
(Imagine-Bench).

Checklist suites (GenEval++, GenEval, custom with a checklist): a group's accuracy is correct / judged images;
``overall`` is the mean of the group accuracies (GenEval++ and GenEval both report the mean over tags), and
``overall_accuracy`` the accuracy over all judged images.

Imagine-Bench: an image scores ``0.8 * min(FF, IP) + 0.2 * AQ``; a category's score is the mean over its images.
``overall`` is the published script's number: the weighted mean of Attribute shift, Hybridization and
Spatiotemporal with weights 3, 2, 2 (its Multi-Object weight is filed under a key no category has, so it never
applies); ``overall_corrected`` adds Multi-Object with weight 2. Weights are renormalised over the categories the
run has, as the published script does.

Failures (the judge never gave a well-formed verdict) are counted per group and left out of every mean; the
summary says so in ``notes``. The published scripts count them as wrong (GenEval++) or as 0 (Imagine-Bench).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

IMAGINE_WEIGHTS_PUBLISHED = {"Attribute shift": 3, "Hybridization": 2, "Spatiotemporal": 2}
IMAGINE_WEIGHTS_CORRECTED = {**IMAGINE_WEIGHTS_PUBLISHED, "Multi-Object": 2}
IMAGINE_CATEGORY_ORDER = ("Attribute shift", "Hybridization", "Spatiotemporal", "Multi-Object")

FAILURES_NOTE = ("{failed} of {images} images have no verdict (the judge's replies stayed malformed or the "
                 "requests failed); they are counted per group and left out of every mean.")


def imagine_image_score(ff: float, ip: float, aq: float) -> float:
    """Imagine-Bench's per-image score: 0.8 * min(fantasy fulfillment, identity preservation) + 0.2 * aesthetics."""
    return 0.8 * min(ff, ip) + 0.2 * aq


def _ordered(names: Iterable[str], order: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    return [n for n in order if n in names] + [n for n in names if n not in order]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_checklist(results: Sequence[dict[str, Any]], order: Sequence[str] = ()) -> dict[str, Any]:
    """Per-group accuracy, their mean (``overall``) and the accuracy over all judged images."""
    groups = []
    for name in _ordered((r["category"] for r in results), order):
        rows = [r for r in results if r["category"] == name]
        judged = [r for r in rows if r["status"] == "ok"]
        correct = sum(1 for r in judged if r["verdict"]["correct"])
        groups.append({"name": name, "images": len(rows), "judged": len(judged), "correct": correct,
                       "failed": sum(1 for r in rows if r["status"] == "failed"),
                       "score": correct / len(judged) if judged else None})
    judged_all = sum(g["judged"] for g in groups)
    summary = {
        "metric": "accuracy",
        "overall": _mean([g["score"] for g in groups if g["score"] is not None]),
        "overall_accuracy": sum(g["correct"] for g in groups) / judged_all if judged_all else None,
        "groups": groups,
    }
    return _with_counts(summary, results)


def score_imagine(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-category means of the per-image score, ``overall`` (published weights) and ``overall_corrected``."""
    groups = []
    for name in _ordered((r["category"] for r in results), IMAGINE_CATEGORY_ORDER):
        rows = [r for r in results if r["category"] == name]
        scores = [imagine_image_score(r["verdict"]["ff"], r["verdict"]["ip"], r["verdict"]["aq"])
                  for r in rows if r["status"] == "ok"]
        judged = [r for r in rows if r["status"] == "ok"]
        groups.append({"name": name, "images": len(rows), "judged": len(scores),
                       "failed": sum(1 for r in rows if r["status"] == "failed"), "score": _mean(scores),
                       "ff": _mean([r["verdict"]["ff"] for r in judged]),
                       "ip": _mean([r["verdict"]["ip"] for r in judged]),
                       "aq": _mean([r["verdict"]["aq"] for r in judged])})
    by_name = {g["name"]: g["score"] for g in groups if g["score"] is not None}
    summary = {
        "metric": "imagine_score",
        "overall": _weighted(by_name, IMAGINE_WEIGHTS_PUBLISHED),
        "overall_corrected": _weighted(by_name, IMAGINE_WEIGHTS_CORRECTED),
        "weights": {"overall": IMAGINE_WEIGHTS_PUBLISHED, "overall_corrected": IMAGINE_WEIGHTS_CORRECTED},
        "groups": groups,
        "types": _type_means(results),
    }
    summary = _with_counts(summary, results)
    if not set(by_name) & set(IMAGINE_WEIGHTS_CORRECTED) and by_name:  # custom groups: an unweighted mean
        summary["overall"] = summary["overall_corrected"] = _mean(list(by_name.values()))
        summary["notes"].insert(0, "no Imagine-Bench category in this run: overall is the mean of the group scores.")
        return summary
    summary["notes"].insert(0, "overall = (3 x Attribute shift + 2 x Hybridization + 2 x Spatiotemporal) / 7, as the "
                               "published script computes it (its Multi-Object weight never applies); "
                               "overall_corrected also weighs Multi-Object by 2 (divided by 9).")
    return summary


def _weighted(scores: dict[str, float], weights: dict[str, int]) -> float | None:
    present = {k: w for k, w in weights.items() if k in scores}
    total = sum(present.values())
    return sum(scores[k] * w for k, w in present.items()) / total if total else None


def _type_means(results: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    out = {}
    for tag in dict.fromkeys(r["tag"] for r in results):
        out[tag] = _mean([imagine_image_score(r["verdict"]["ff"], r["verdict"]["ip"], r["verdict"]["aq"])
                          for r in results if r["tag"] == tag and r["status"] == "ok"])
    return out


def _with_counts(summary: dict[str, Any], results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    failed = sum(1 for r in results if r["status"] == "failed")
    summary["images"] = len(results)
    summary["judged"] = sum(1 for r in results if r["status"] == "ok")
    summary["failed"] = failed
    summary["notes"] = [FAILURES_NOTE.format(failed=failed, images=len(results))] if failed else []
    return summary


def score_results(suite: str, results: Sequence[dict[str, Any]], *, tag_order: Sequence[str] = ()) -> dict[str, Any]:
    """The scores section of a summary for ``suite``. Custom runs are scored per protocol (``checklist`` and/or
    ``imagine`` sections); their ``overall`` is the one protocol's overall, or ``None`` when both are mixed."""
    if suite == "imagine":
        return score_imagine(results)
    if suite == "geneval":
        if not any(r["status"] != "unscored" for r in results):
            return {"metric": "accuracy", "overall": None, "groups": [], "images": len(results), "judged": 0,
                    "failed": 0, "notes": ["GenEval is scored by an object detector (its published protocol); none "
                                           "was configured, so the images were generated and left unscored."]}
        return score_checklist(results, tag_order)
    if suite == "custom":
        checklist = [r for r in results if r.get("protocol", "checklist") == "checklist"]
        imagine = [r for r in results if r.get("protocol") == "imagine"]
        if not imagine:
            return score_checklist(checklist, tag_order)
        if not checklist:
            return score_imagine(imagine)
        return {"metric": "mixed", "overall": None, "checklist": score_checklist(checklist, tag_order),
                "imagine": score_imagine(imagine), "groups": [], "images": len(results),
                "judged": sum(1 for r in results if r["status"] == "ok"),
                "failed": sum(1 for r in results if r["status"] == "failed"),
                "notes": ["custom prompts mix checklist and Imagine-style notes: see the two sections; there is "
                          "no single overall."]}
    return score_checklist(results, tag_order)
