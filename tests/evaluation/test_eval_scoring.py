"""Scoring against hand computations: GenEval++ mean of tag accuracies, Imagine-Bench per-image score, category
means, the published overall (3, 2, 2 / 7) and the corrected one (3, 2, 2, 2 / 9); failures counted, not scored."""

from __future__ import annotations

import pytest

from worker.evaluation.scoring import imagine_image_score, score_checklist, score_imagine, score_results


def _c(category: str, correct: bool | None) -> dict:
    if correct is None:
        return {"tag": category, "category": category, "status": "failed", "verdict": None}
    return {"tag": category, "category": category, "status": "ok", "verdict": {"correct": correct}}


def _i(tag: str, category: str, ff: float, ip: float, aq: float, ok: bool = True) -> dict:
    return {"tag": tag, "category": category, "status": "ok" if ok else "failed",
            "verdict": {"ff": ff, "ip": ip, "aq": aq} if ok else None}


def test_checklist_mean_of_tag_accuracies_with_a_failure():
    # color_attr: 3 of 4 correct; counting: 1 of 2 judged correct, 1 failed.
    results = [_c("color_attr", True), _c("color_attr", True), _c("color_attr", False), _c("color_attr", True),
               _c("counting", True), _c("counting", False), _c("counting", None)]
    s = score_checklist(results, order=("counting", "color_attr"))
    assert [g["name"] for g in s["groups"]] == ["counting", "color_attr"]
    counting, color = s["groups"]
    assert (counting["judged"], counting["correct"], counting["failed"], counting["score"]) == (2, 1, 1, 0.5)
    assert color["score"] == 0.75
    assert s["overall"] == pytest.approx((0.5 + 0.75) / 2)  # 0.625, not the pooled 4/6
    assert s["overall_accuracy"] == pytest.approx(4 / 6)
    assert (s["images"], s["judged"], s["failed"]) == (7, 6, 1)
    assert "1 of 7 images have no verdict" in s["notes"][0]


def test_imagine_image_score():
    assert imagine_image_score(8, 6, 9) == pytest.approx(0.8 * 6 + 0.2 * 9)  # 6.6
    assert imagine_image_score(3, 10, 10) == pytest.approx(4.4)


def test_imagine_categories_overall_and_corrected():
    results = [
        _i("COLOR", "Attribute shift", 8, 6, 9),      # 6.6
        _i("SIZE", "Attribute shift", 10, 10, 5),     # 9.0   -> AS = 7.8
        _i("MATERIAL", "Hybridization", 5, 7, 10),    # 6.0   -> H = 6.0
        _i("TIME", "Spatiotemporal", 2, 9, 7),        # 3.0
        _i("ENVIRONMENT", "Spatiotemporal", 0, 0, 0, ok=False),  # failure, left out -> ST = 3.0
        _i("Multi-Object", "Multi-Object", 9, 9, 4),  # 8.0   -> MO = 8.0
    ]
    s = score_imagine(results)
    by = {g["name"]: g for g in s["groups"]}
    assert list(by) == ["Attribute shift", "Hybridization", "Spatiotemporal", "Multi-Object"]
    assert by["Attribute shift"]["score"] == pytest.approx(7.8)
    assert by["Spatiotemporal"]["score"] == pytest.approx(3.0) and by["Spatiotemporal"]["failed"] == 1
    assert by["Attribute shift"]["ff"] == pytest.approx(9.0)
    assert s["overall"] == pytest.approx((3 * 7.8 + 2 * 6.0 + 2 * 3.0) / 7)            # 5.914...
    assert s["overall_corrected"] == pytest.approx((3 * 7.8 + 2 * 6.0 + 2 * 3.0 + 2 * 8.0) / 9)  # 6.377...
    assert s["types"]["COLOR"] == pytest.approx(6.6) and s["types"]["ENVIRONMENT"] is None
    assert s["failed"] == 1 and any("(3 x Attribute shift" in n for n in s["notes"])


def test_imagine_weights_renormalise_over_present_categories():
    s = score_imagine([_i("COLOR", "Attribute shift", 5, 5, 5), _i("Multi-Object", "Multi-Object", 10, 10, 10)])
    assert s["overall"] == pytest.approx(5.0)  # only Attribute shift counts in the published overall
    assert s["overall_corrected"] == pytest.approx((3 * 5 + 2 * 10) / 5)


def test_geneval_without_detector_says_so_and_custom_mixed_has_no_overall():
    unscored = [{"tag": "counting", "category": "counting", "status": "unscored", "verdict": None}]
    s = score_results("geneval", unscored)
    assert s["overall"] is None and "object detector" in s["notes"][0]
    mixed = [{**_c("custom", True), "protocol": "checklist"},
             {**_i("custom", "custom", 5, 5, 5), "protocol": "imagine"}]
    m = score_results("custom", mixed)
    assert m["overall"] is None and m["checklist"]["overall"] == 1.0 and m["imagine"]["overall"] == 5.0
    assert score_results("custom", [{**_c("a", True), "protocol": "checklist"}])["overall"] == 1.0
