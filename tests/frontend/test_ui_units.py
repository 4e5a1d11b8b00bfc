"""The UI's pure parts: the request bodies it builds are valid job payloads, "reuse parameters" gives the
same request back, gateway errors read as one line, example references are drawn."""

from __future__ import annotations

import httpx
import pytest
from PIL import Image

from echo4o.jobs import ASPECT_PRESETS, GenerateJob
from frontend_gradio import views
from frontend_gradio.app import CUSTOM, FOLLOW_REF, collect_params, control_values_from_params
from frontend_gradio.client import ApiError, _error_from_response
from frontend_gradio.examples import write_reference_examples

NAMES = ["aspect", "height", "width", "num_images", "num_steps", "seed_mode", "seed", "cfg_text_scale",
         "cfg_img_scale", "interval_low", "interval_high", "cfg_renorm_type", "cfg_renorm_min", "timestep_shift",
         "model_version"]


def _values(**over):
    base = {"aspect": "1:1", "height": 1024, "width": 1024, "num_images": 1, "num_steps": 50, "seed_mode": "random",
            "seed": 0, "cfg_text_scale": 4.0, "cfg_img_scale": 1.0, "interval_low": 0.4, "interval_high": 1.0,
            "cfg_renorm_type": "global", "cfg_renorm_min": 0.0, "timestep_shift": 3.0, "model_version": ""}
    base.update(over)
    return [base[n] for n in NAMES]


def test_preset_request_is_a_valid_generate_job() -> None:
    params = collect_params(NAMES, _values(aspect="16:9", num_steps=8, num_images=2), "  a red fox  ", None)
    assert params["prompt"] == "a red fox" and params["aspect_ratio"] == "16:9"
    assert "height" not in params and "seed" not in params and "model_version" not in params
    job = GenerateJob.model_validate(params)
    assert (job.height, job.width) == ASPECT_PRESETS["16:9"]
    assert job.num_steps == 8 and job.num_images == 2 and job.cfg_interval == (0.4, 1.0)


def test_custom_size_fixed_seed_and_model() -> None:
    params = collect_params(
        NAMES, _values(aspect=CUSTOM, height=320, width=640, seed_mode="fixed", seed=77, model_version="v2"), "x",
        None)
    assert (params["height"], params["width"], params["seed"], params["model_version"]) == (320, 640, 77, "v2")
    assert "aspect_ratio" not in params
    GenerateJob.model_validate(params)


def test_follow_reference_sends_no_size() -> None:
    params = collect_params(NAMES, _values(aspect=FOLLOW_REF), "x", None)
    assert not {"height", "width", "aspect_ratio"} & params.keys()


def test_reuse_last_seed() -> None:
    assert collect_params(NAMES, _values(seed_mode="reuse last"), "x", 1234)["seed"] == 1234
    with pytest.raises(ApiError) as info:
        collect_params(NAMES, _values(seed_mode="reuse last"), "x", None)
    assert info.value.param == "seed" and "no last seed" in info.value.readable()


@pytest.mark.parametrize("mode", ["generate", "multiref"])
def test_reuse_parameters_round_trip(mode: str) -> None:
    """Stored params (as the gateway stores them) -> controls -> the same request again."""
    sent = collect_params(
        NAMES, _values(aspect="4:3", num_steps=12, seed_mode="fixed", seed=5, cfg_text_scale=6.5,
                       interval_low=0.1, interval_high=0.9, cfg_renorm_type="channel", cfg_renorm_min=0.25,
                       timestep_shift=2.0, num_images=3), "a cat", None)
    stored = GenerateJob.model_validate(sent).model_dump(mode="json")
    values = control_values_from_params(mode, stored, stored["seed"])
    again = collect_params(NAMES, [values[n] for n in NAMES], stored["prompt"], None)
    assert again == sent


def test_reuse_parameters_of_custom_size() -> None:
    stored = GenerateJob(prompt="x", height=512, width=256, seed=9).model_dump(mode="json")
    values = control_values_from_params("generate", stored, 9)
    assert (values["aspect"], values["height"], values["width"], values["seed_mode"]) == (CUSTOM, 512, 256, "fixed")


def test_contract_error_reads_as_one_line() -> None:
    resp = httpx.Response(422, json={"error": {"message": "height must be a multiple of 16", "type":
                                               "invalid_request_error", "param": "height", "code": "invalid_value"}})
    err = _error_from_response(resp)
    assert (err.status, err.param, err.code, err.type) == (422, "height", "invalid_value", "invalid_request_error")
    assert err.readable() == "Height must be a multiple of 16 (field: height)."


def test_auth_and_rate_limit_errors_say_what_to_do() -> None:
    unauth = _error_from_response(httpx.Response(401, json={"error": {"message": "API key missing",
                                                                      "type": "authentication_error",
                                                                      "param": None, "code": "missing_api_key"}}))
    assert "echo4o keys create" in unauth.readable()
    limited = _error_from_response(httpx.Response(429, headers={"Retry-After": "7"}, json={"error": {
        "message": "Too many jobs", "type": "rate_limit_error", "param": None, "code": "rate_limited"}}))
    assert limited.readable().endswith("Try again in 7 s.")


def test_non_contract_error_body_is_still_readable() -> None:
    err = _error_from_response(httpx.Response(502, text="Bad Gateway from the proxy"))
    assert err.status == 502 and "502" in err.readable() and "Bad Gateway from the proxy" in err.readable()


def test_status_box_states() -> None:
    html = views.status_html("running", "Step 3 / 8", job_id="a" * 32, step=3, total=8)
    assert 'data-state="running"' in html and 'data-step="3"' in html and "width:37.5%" in html
    assert "aaaaaaaaaaaa" in html and "a" * 13 not in html  # short job id
    assert "<script>" not in views.status_html("error", "<script>alert(1)</script>")
    with pytest.raises(AssertionError):
        views.status_html("weird", "x")


def test_example_references_are_drawn(tmp_path) -> None:
    paths = write_reference_examples(tmp_path)
    assert [p.name for p in paths] == ["red-ball.png", "blue-cube.png"]
    for p in paths:
        with Image.open(p) as img:
            assert img.size == (256, 256) and len(img.getcolors(maxcolors=1 << 20)) > 50  # a drawing, not a flat colour


def test_unreachable_gateway_names_the_fix() -> None:
    import socket

    from frontend_gradio.client import GatewayClient

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = GatewayClient(f"http://127.0.0.1:{port}")
    with pytest.raises(ApiError) as info:
        client.health()
    assert info.value.code == "gateway_unreachable"
    assert f"127.0.0.1:{port}" in info.value.readable() and "echo4o serve" in info.value.readable()


def test_ui_command_refuses_a_non_http_api_url() -> None:
    from typer.testing import CliRunner

    from echo4o.cli import app

    result = CliRunner().invoke(app, ["ui", "--api", "127.0.0.1:8000"])
    assert result.exit_code == 2
    assert "--api must be an http(s) URL" in result.output


def test_downloaded_results_are_pruned_after_their_ttl(tmp_path) -> None:
    import os
    import time

    from frontend_gradio.app import DemoApp

    app = DemoApp("http://127.0.0.1:9", cache_dir=tmp_path, cache_ttl_s=3600)  # no call is made
    old, fresh = tmp_path / "results" / "old", tmp_path / "results" / "fresh"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "0.png").write_bytes(b"x")
    past = time.time() - 7200
    os.utime(old, (past, past))
    app._prune()
    assert not old.exists() and fresh.exists()
    assert (tmp_path / "examples" / "red-ball.png").exists()
