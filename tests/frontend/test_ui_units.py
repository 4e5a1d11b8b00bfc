"""The UI's pure parts: the form is built from the gateway's ``GET /parameters`` (a real gateway app, in
process), the request bodies it builds are valid job payloads, "reuse parameters" gives the same request back,
gateway errors read as one line, example references are drawn, results are pruned."""

from __future__ import annotations

import copy

import gradio as gr
import httpx
import pytest
from PIL import Image

from echo4o.jobs import GenerateJob, MultirefJob
from frontend_gradio import views
from frontend_gradio.client import ApiError, _error_from_response
from frontend_gradio.controls import CONTROL_NAMES, CUSTOM, FOLLOW_REF, Form
from frontend_gradio.examples import write_reference_examples


def _values(form: Form, **over) -> dict:
    return {**form.default_values(), **over}


@pytest.fixture
def t2i(parameters) -> Form:
    return Form("generate", parameters)


@pytest.mark.parametrize("mode", ["generate", "multiref"])
def test_the_form_starts_at_what_the_gateway_applies(parameters, mode: str) -> None:
    """Sending the untouched form asks for exactly the job the gateway makes of an empty request."""
    form = Form(mode, parameters)
    sent = form.request(form.default_values(), "a cat", None)
    model = GenerateJob if mode == "generate" else MultirefJob
    extra = {} if mode == "generate" else {"references": ["uploads/x/0.png"]}
    job = model.model_validate({**sent, **extra, "seed": 1}).model_dump(mode="json")
    bare = {k: v for k, v in parameters["defaults"][mode].items() if k != "priority"}
    if mode == "multiref":
        assert form.default_values()["aspect"] == FOLLOW_REF and not {"height", "width", "aspect_ratio"} & sent.keys()
    for name, value in bare.items():
        assert job[name] == value, name


def test_controls_take_bounds_and_choices_from_the_parameters(parameters) -> None:
    """Change the gateway's answer and the controls follow: the UI keeps no copy of the limits or presets."""
    changed = copy.deepcopy(parameters)
    changed["limits"].update(steps_max=60, side_max=512, num_images_max=2, seed_max=99, scale_max=12.0)
    changed["aspect_ratios"]["2:1"] = [256, 512]
    changed["renorm_types"] = ["global", "channel"]
    changed["defaults"]["generate"].update(height=256, width=512, num_steps=20, cfg_text_scale=5.0)
    form = Form("generate", changed)
    with gr.Blocks():
        c = form.build("t")
    assert c.names == CONTROL_NAMES
    assert (c["num_steps"].maximum, c["num_steps"].value) == (60, 20)
    assert (c["height"].maximum, c["width"].maximum, c["height"].step) == (512, 512, parameters["limits"][
        "side_multiple"])
    assert c["num_images"].maximum == 2 and c["seed"].maximum == 99 and c["cfg_text_scale"].maximum == 12.0
    assert c["cfg_text_scale"].value == 5.0
    assert [value for _label, value in c["aspect"].choices] == [*changed["aspect_ratios"], CUSTOM]
    assert c["aspect"].value == "2:1"  # the preset of the default size
    assert [value for _label, value in c["cfg_renorm_type"].choices] == ["global", "channel"]
    assert form.request(_values(form, aspect="2:1"), "x", None)["aspect_ratio"] == "2:1"


def test_multiref_controls_offer_follow_reference_first(parameters) -> None:
    with gr.Blocks():
        c = Form("multiref", parameters).build("m")
    assert c["aspect"].value == FOLLOW_REF and c["aspect"].choices[0][1] == FOLLOW_REF
    assert c["cfg_img_scale"].value == parameters["defaults"]["multiref"]["cfg_img_scale"]


def test_a_mode_the_gateway_does_not_know_is_refused(parameters) -> None:
    with pytest.raises(ValueError, match="no defaults for 'finetune'"):
        Form("finetune", parameters)


def test_preset_request_is_a_valid_generate_job(t2i: Form, parameters) -> None:
    params = t2i.request(_values(t2i, aspect="16:9", num_steps=8, num_images=2), "  a red fox  ", None)
    assert params["prompt"] == "a red fox" and params["aspect_ratio"] == "16:9"
    assert "height" not in params and "seed" not in params and "model_version" not in params
    job = GenerateJob.model_validate(params)
    assert [job.height, job.width] == parameters["aspect_ratios"]["16:9"]
    assert job.num_steps == 8 and job.num_images == 2
    assert list(job.cfg_interval) == parameters["defaults"]["generate"]["cfg_interval"]


def test_custom_size_fixed_seed_and_model(t2i: Form) -> None:
    params = t2i.request(
        _values(t2i, aspect=CUSTOM, height=320, width=640, seed_mode="fixed", seed=77, model_version="v2"), "x",
        None)
    assert (params["height"], params["width"], params["seed"], params["model_version"]) == (320, 640, 77, "v2")
    assert "aspect_ratio" not in params
    GenerateJob.model_validate(params)


def test_follow_reference_sends_no_size(parameters) -> None:
    form = Form("multiref", parameters)
    params = form.request(_values(form, aspect=FOLLOW_REF), "x", None)
    assert not {"height", "width", "aspect_ratio"} & params.keys()


def test_reuse_last_seed(t2i: Form) -> None:
    assert t2i.request(_values(t2i, seed_mode="reuse last"), "x", 1234)["seed"] == 1234
    with pytest.raises(ApiError) as info:
        t2i.request(_values(t2i, seed_mode="reuse last"), "x", None)
    assert info.value.param == "seed" and "no last seed" in info.value.readable()


@pytest.mark.parametrize("mode", ["generate", "multiref"])
def test_reuse_parameters_round_trip(parameters, mode: str) -> None:
    """Stored params (as the gateway stores them) -> controls -> the same request again."""
    form = Form(mode, parameters)
    sent = form.request(
        _values(form, aspect="4:3", num_steps=12, seed_mode="fixed", seed=5, cfg_text_scale=6.5,
                interval_low=0.1, interval_high=0.9, cfg_renorm_type="channel", cfg_renorm_min=0.25,
                timestep_shift=2.0, num_images=3), "a cat", None)
    stored = GenerateJob.model_validate(sent).model_dump(mode="json")
    values = form.values_from_params(stored, stored["seed"])
    assert sorted(values) == sorted(CONTROL_NAMES)
    assert form.request(values, stored["prompt"], None) == sent


def test_reuse_parameters_of_custom_size(t2i: Form) -> None:
    stored = GenerateJob(prompt="x", height=512, width=256, seed=9).model_dump(mode="json")
    values = t2i.values_from_params(stored, 9)
    assert (values["aspect"], values["height"], values["width"], values["seed_mode"]) == (CUSTOM, 512, 256, "fixed")


def test_reuse_of_a_job_without_guidance_takes_the_modes_defaults(parameters) -> None:
    """A job sent by another client leaves guidance out (null in the stored params): the form shows what the
    gateway applied, and sends it explicitly."""
    form = Form("multiref", parameters)
    stored = MultirefJob(prompt="x", references=["uploads/a/0.png"], seed=3).model_dump(mode="json")
    values = form.values_from_params(stored, None)
    d = parameters["defaults"]["multiref"]
    assert (values["aspect"], values["seed_mode"]) == (FOLLOW_REF, "random")
    assert (values["cfg_img_scale"], [values["interval_low"], values["interval_high"]], values["cfg_renorm_type"]) \
        == (d["cfg_img_scale"], d["cfg_interval"], d["cfg_renorm_type"])


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
    app.results.prune()
    assert not old.exists() and fresh.exists()
    assert (tmp_path / "examples" / "red-ball.png").exists()


def test_ui_command_names_the_gateway_it_cannot_reach() -> None:
    """The page is built from the gateway's /parameters: with no gateway, `echo4o ui` stops at once and says
    which URL it tried and how to start the gateway."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "echo4o", "ui", "--api", f"http://127.0.0.1:{port}",
                           "--port", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the demo UI cannot be built: Cannot reach the gateway at ")
    assert f"http://127.0.0.1:{port}/" in last and "echo4o serve" in last


def test_follower_updates_become_component_values() -> None:
    """KEEP leaves a component alone; while a job runs the preview and download box are visibility updates;
    the final update is plain values (what gradio_client callers get)."""
    from frontend_gradio.app import RESULT_OUTPUTS, result_outputs
    from frontend_gradio.follower import JobUpdate

    skip = gr.skip()
    queued = dict(zip(RESULT_OUTPUTS, result_outputs(JobUpdate("queued", "Queued", job_id="j" * 32)), strict=True))
    assert 'data-state="queued"' in queued["status"]
    assert all(queued[name] == skip for name in RESULT_OUTPUTS[1:])

    start = dict(zip(RESULT_OUTPUTS, result_outputs(JobUpdate("submitting", "Sending", preview=None, gallery=[],
                                                              files=None, params=None)), strict=True))
    assert isinstance(start["preview"], gr.Image) and start["preview"].visible is False
    assert isinstance(start["files"], gr.File) and start["files"].visible is False
    assert start["gallery"] == [] and start["params"] is None and start["last_seed"] == skip

    done = dict(zip(RESULT_OUTPUTS, result_outputs(JobUpdate(
        "done", "Done", job_id="j" * 32, preview=None, gallery=[("/a.png", "seed 7 · #0")], files=["/a.png"],
        params={"seed": 7}, seed=7)), strict=True))
    assert done["preview"] is None and done["files"] == ["/a.png"] and done["params"] == {"seed": 7}
    assert done["last_seed"] == 7 == done["seed"]
