"""Helpers of the UI tests that are not fixtures."""

from __future__ import annotations


def long_job_fields(parameters: dict) -> dict:
    """Request fields of the longest job the gateway allows (largest preset size, most steps and images), so
    that a cancel sent after its first progress event lands mid-run even on a fast machine."""
    limits = parameters["limits"]
    largest = max(parameters["aspect_ratios"], key=lambda a: parameters["aspect_ratios"][a][0] * parameters[
        "aspect_ratios"][a][1])
    return {"aspect": largest, "num_steps": limits["steps_max"], "num_images": limits["num_images_max"]}

