"""The Gradio demo. A client of the gateway's HTTP API (frontend_gradio.client), nothing else.

``build_app(api_url, api_key)`` returns the Blocks; ``launch(...)`` serves them (``echo4o ui``). Each browser
session may enter its own API key; without one it uses the key the UI was started with. The admin tab is
shown only while the session's key is an admin key.
"""

from __future__ import annotations

import base64
import inspect
import io
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from echo4o.jobs import ASPECT_PRESETS
from echo4o.logging import get_logger
from frontend_gradio import views
from frontend_gradio.admin import AdminContext, build_admin_tab
from frontend_gradio.client import ApiError, GatewayClient
from frontend_gradio.examples import MULTIREF_INSTRUCTIONS, TEXT_EXAMPLES, write_reference_examples

log = get_logger(__name__)

ASPECTS = list(ASPECT_PRESETS)
CUSTOM = "custom"
FOLLOW_REF = "follow reference"
RENORM_TYPES = ["global", "channel", "text_channel"]
SEED_MODES = ["random", "fixed", "reuse last"]
MAX_SEED = 2**32 - 1
# Every event but the two Generate buttons is internal: hidden from the API page and from gradio_client.
PRIVATE: dict[str, Any] = {"api_visibility": "private"}

# The engine's defaults per mode (docs/contracts.md, "Engine"); the UI starts from them.
DEFAULTS = {
    "generate": {"cfg_text_scale": 4.0, "cfg_img_scale": 1.0, "cfg_interval": (0.4, 1.0),
                 "cfg_renorm_type": "global", "aspect": "1:1"},
    "multiref": {"cfg_text_scale": 4.0, "cfg_img_scale": 2.0, "cfg_interval": (0.0, 1.0),
                 "cfg_renorm_type": "text_channel", "aspect": FOLLOW_REF},
}
CACHE_TTL_S = 24 * 3600  # downloaded results (and Gradio's copies of them) are kept a day

COMMON_DEFAULTS = {"num_steps": 50, "timestep_shift": 3.0, "cfg_renorm_min": 0.0, "num_images": 1}

THEME = gr.themes.Soft(
    primary_hue="indigo",
    secondary_hue="slate",
    # System fonts: the page loads nothing from outside the UI's own server.
    font=["ui-sans-serif", "system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
)


# --- per-session running jobs (for Cancel) ------------------------------------------------------------
@dataclass
class _Running:
    job_id: str | None = None
    key: str | None = None
    cancel: bool = False


class RunningJobs:
    """The job each (session, tab) is waiting on, so that its Cancel button can reach it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], _Running] = {}

    def start(self, session: str, tab: str, key: str | None) -> _Running:
        entry = _Running(key=key)
        with self._lock:
            self._jobs[(session, tab)] = entry
        return entry

    def finish(self, session: str, tab: str, entry: _Running) -> None:
        with self._lock:
            if self._jobs.get((session, tab)) is entry:
                del self._jobs[(session, tab)]

    def request_cancel(self, session: str, tab: str) -> _Running | None:
        with self._lock:
            entry = self._jobs.get((session, tab))
            if entry:
                entry.cancel = True
            return entry


# --- the generation controls, shared by both tabs -----------------------------------------------------
@dataclass
class Controls:
    names: list[str] = field(default_factory=list)
    components: list[Any] = field(default_factory=list)

    def add(self, name: str, component: Any) -> Any:
        self.names.append(name)
        self.components.append(component)
        return component

    def __getitem__(self, name: str) -> Any:
        return self.components[self.names.index(name)]


def build_controls(mode: str, prefix: str) -> Controls:
    d = {**COMMON_DEFAULTS, **DEFAULTS[mode]}
    c = Controls()
    aspects = ([FOLLOW_REF] if mode == "multiref" else []) + [
        (f"{a}  ({h}×{w})", a) for a, (h, w) in ASPECT_PRESETS.items()] + [CUSTOM]
    c.add("aspect", gr.Radio(aspects, value=d["aspect"], label="Aspect ratio", elem_id=f"{prefix}-aspect"))
    with gr.Row(visible=False) as size_row:
        c.add("height", gr.Slider(16, 1024, value=1024, step=16, label="Height", elem_id=f"{prefix}-height"))
        c.add("width", gr.Slider(16, 1024, value=1024, step=16, label="Width", elem_id=f"{prefix}-width"))
    c["aspect"].change(lambda a: gr.Row(visible=a == CUSTOM), c["aspect"], size_row, queue=False,
                       show_progress="hidden", **PRIVATE)
    with gr.Row():
        c.add("num_images", gr.Slider(1, 4, value=d["num_images"], step=1, label="Images",
                                      elem_id=f"{prefix}-num-images"))
        c.add("num_steps", gr.Slider(2, 100, value=d["num_steps"], step=1, label="Steps",
                                     elem_id=f"{prefix}-steps"))
    with gr.Row(equal_height=True):
        c.add("seed_mode", gr.Radio(SEED_MODES, value="random", label="Seed", elem_id=f"{prefix}-seed-mode",
                                    scale=2))
        c.add("seed", gr.Number(0, label="Seed value", precision=0, minimum=0, maximum=MAX_SEED,
                                elem_id=f"{prefix}-seed", scale=1))
    with gr.Accordion("Guidance and sampler", open=False):
        with gr.Row():
            c.add("cfg_text_scale", gr.Slider(1.0, 10.0, value=d["cfg_text_scale"], step=0.1,
                                              label="Text CFG scale"))
            c.add("cfg_img_scale", gr.Slider(1.0, 5.0, value=d["cfg_img_scale"], step=0.1,
                                             label="Image CFG scale"))
        with gr.Row():
            c.add("interval_low", gr.Slider(0.0, 1.0, value=d["cfg_interval"][0], step=0.05,
                                            label="CFG interval from"))
            c.add("interval_high", gr.Slider(0.0, 1.0, value=d["cfg_interval"][1], step=0.05,
                                             label="CFG interval to"))
        with gr.Row():
            c.add("cfg_renorm_type", gr.Dropdown(RENORM_TYPES, value=d["cfg_renorm_type"], label="CFG renorm"))
            c.add("cfg_renorm_min", gr.Slider(0.0, 1.0, value=d["cfg_renorm_min"], step=0.05,
                                              label="Renorm floor"))
            c.add("timestep_shift", gr.Slider(1.0, 5.0, value=d["timestep_shift"], step=0.1,
                                              label="Timestep shift"))
        c.add("model_version", gr.Dropdown([("served default", "")], value="", label="Model version",
                                           elem_id=f"{prefix}-model"))
    return c


def collect_params(names: list[str], values: list[Any], prompt: str, last_seed: int | None) -> dict[str, Any]:
    """The request body from the controls' values (docs/contracts.md, GenerateJob / MultirefJob)."""
    v = dict(zip(names, values, strict=True))
    params: dict[str, Any] = {
        "prompt": (prompt or "").strip(),
        "num_steps": int(v["num_steps"]),
        "num_images": int(v["num_images"]),
        "cfg_text_scale": float(v["cfg_text_scale"]),
        "cfg_img_scale": float(v["cfg_img_scale"]),
        "cfg_interval": [float(v["interval_low"]), float(v["interval_high"])],
        "cfg_renorm_type": v["cfg_renorm_type"],
        "cfg_renorm_min": float(v["cfg_renorm_min"]),
        "timestep_shift": float(v["timestep_shift"]),
    }
    if v["aspect"] == CUSTOM:
        params["height"], params["width"] = int(v["height"]), int(v["width"])
    elif v["aspect"] in ASPECTS:
        params["aspect_ratio"] = v["aspect"]
    if v["seed_mode"] == "fixed" and v["seed"] is not None:
        params["seed"] = int(v["seed"])
    elif v["seed_mode"] == "reuse last":
        if last_seed is None:
            raise ApiError("There is no last seed yet: generate once, or choose a fixed seed", param="seed",
                           code="no_last_seed")
        params["seed"] = int(last_seed)
    if v["model_version"]:
        params["model_version"] = v["model_version"]
    return params


def control_values_from_params(mode: str, params: dict[str, Any], seed: Any) -> dict[str, Any]:
    """The inverse of :func:`collect_params`, for "reuse parameters"."""
    d = {**COMMON_DEFAULTS, **DEFAULTS[mode]}
    interval = params.get("cfg_interval") or d["cfg_interval"]
    if params.get("aspect_ratio") in ASPECTS:
        aspect = params["aspect_ratio"]
    elif params.get("height") and params.get("width"):
        aspect = CUSTOM
    else:
        aspect = d["aspect"]
    return {
        "aspect": aspect,
        "height": params.get("height") or 1024,
        "width": params.get("width") or 1024,
        "num_images": params.get("num_images") or d["num_images"],
        "num_steps": params.get("num_steps") or d["num_steps"],
        "seed_mode": "fixed" if seed not in (None, "") else "random",
        "seed": int(seed) if seed not in (None, "") else 0,
        "cfg_text_scale": params.get("cfg_text_scale") or d["cfg_text_scale"],
        "cfg_img_scale": params.get("cfg_img_scale") or d["cfg_img_scale"],
        "interval_low": interval[0],
        "interval_high": interval[1],
        "cfg_renorm_type": params.get("cfg_renorm_type") or d["cfg_renorm_type"],
        "cfg_renorm_min": params.get("cfg_renorm_min") or d["cfg_renorm_min"],
        "timestep_shift": params.get("timestep_shift") or d["timestep_shift"],
        "model_version": params.get("model_version") or "",
    }


def _session(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or uuid.uuid4().hex


def _decode_preview(data: Any) -> Image.Image | None:
    if not data:
        return None
    try:
        raw = base64.b64decode(data.split(",", 1)[-1])
        return Image.open(io.BytesIO(raw)).convert("RGB")
    except Exception:  # noqa: BLE001 - a broken preview is dropped, the job goes on
        log.warning("undecodable preview dropped")
        return None


# --- the app ------------------------------------------------------------------------------------------
class DemoApp:
    """Holds the gateway client and the per-session job registry; builds the Blocks."""

    def __init__(self, api_url: str, api_key: str | None = None, *, concurrency: int = 16,
                 cache_dir: Path | None = None, cache_ttl_s: float = CACHE_TTL_S) -> None:
        self.client = GatewayClient(api_url, api_key)
        self.api_url = api_url
        self.has_default_key = bool(api_key)
        self.concurrency = concurrency
        self.running = RunningJobs()
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="echo4o-ui-"))
        self.example_refs = write_reference_examples(self.cache_dir / "examples")
        self.cache_ttl_s = cache_ttl_s
        self._last_prune = 0.0

    def _prune(self) -> None:
        """Drop downloaded results older than the cache TTL (at most once a minute)."""
        now = time.time()
        if now - self._last_prune < 60:
            return
        self._last_prune = now
        for folder in (self.cache_dir / "results").glob("*"):
            try:
                if now - folder.stat().st_mtime > self.cache_ttl_s:
                    shutil.rmtree(folder, ignore_errors=True)
            except FileNotFoundError:
                pass

    # ---- generation ----
    def _download(self, job: dict[str, Any], key: str | None) -> list[Path]:
        self._prune()
        folder = self.cache_dir / "results" / job["id"]
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for item in (job.get("result") or {}).get("images") or []:
            index = int(item.get("index", len(paths))) if isinstance(item, dict) else len(paths)
            path = folder / f"{index}.png"
            if not path.exists():
                tmp = path.with_suffix(".part")
                tmp.write_bytes(self.client.image_bytes(job["id"], index, key=key, fmt="png"))
                tmp.replace(path)
            paths.append(path)
        return paths

    def run_job(self, tab: str, key: str | None, submit: Callable[[], dict[str, Any]],
                request: gr.Request | None) -> Iterator[tuple[Any, ...]]:
        """Submit, follow the event stream, yield UI updates:
        (status, preview, gallery, files, params, last_seed, seed)."""
        skip = gr.skip()
        session = _session(request)
        key = key or None
        entry = self.running.start(session, tab, key)
        hidden_preview = gr.Image(value=None, visible=False)
        try:
            yield (views.status_html("submitting", "Sending the request…"), hidden_preview, [],
                   gr.File(value=None, visible=False), None, skip, skip)
            try:
                job = submit()
            except ApiError as err:
                gr.Warning(err.readable())
                yield views.status_html("error", err.readable()), skip, skip, skip, skip, skip, skip
                return
            job_id = job["id"]
            entry.job_id = job_id
            log.info("job submitted", extra={"job_id": job_id, "tab": tab, "session": session[:8]})
            if entry.cancel:
                self.client.cancel(job_id, key=key)
            started = time.monotonic()
            yield views.status_html("queued", "Queued", job_id=job_id), skip, skip, skip, skip, skip, skip
            for event in self.client.events(job, key=key):
                if event.name == "queued":
                    pos = event.data.get("position")
                    text = "Queued" if pos is None else f"Queued: position {pos}"
                    yield views.status_html("queued", text, job_id=job_id), skip, skip, skip, skip, skip, skip
                elif event.name == "progress":
                    step, total = event.data.get("step") or 0, event.data.get("total") or 0
                    preview = _decode_preview(event.data.get("preview"))
                    text = f"Step {step} / {total}" if total else "Running"
                    yield (views.status_html("running", text, job_id=job_id, step=step, total=total),
                           gr.Image(value=preview, visible=True) if preview is not None else skip,
                           skip, skip, skip, skip, skip)
                elif event.name == "done":
                    done = event.data if event.data.get("id") else self.client.get_job(job_id, key=key)
                    paths = self._download(done, key)
                    seed = (done.get("result") or {}).get("seed")
                    took = time.monotonic() - started
                    params = {**(done.get("params") or {}), "seed": seed}
                    gallery = [(str(p), f"seed {seed} · #{i}") for i, p in enumerate(paths)]
                    text = f"Done in {took:.1f} s · {len(paths)} image(s) · seed {seed}"
                    # plain values in the last answer: it is what API clients get (see _wire's .then)
                    yield (views.status_html("done", text, job_id=job_id), None, gallery, [str(p) for p in paths],
                           params, seed, seed if seed is not None else skip)
                    return
                elif event.name == "failed":
                    msg = event.data.get("message") or "the job failed"
                    code = event.data.get("code")
                    text = f"Generation failed: {msg}" + (f" ({code})" if code else "")
                    gr.Warning(text)
                    yield views.status_html("failed", text, job_id=job_id), skip, skip, skip, skip, skip, skip
                    return
                elif event.name == "cancelled":
                    yield views.status_html("cancelled", "Cancelled", job_id=job_id), None, skip, skip, skip, skip, skip
                    return
        except ApiError as err:
            gr.Warning(err.readable())
            yield views.status_html("error", err.readable()), skip, skip, skip, skip, skip, skip
        finally:
            self.running.finish(session, tab, entry)

    def cancel(self, tab: str, request: gr.Request | None) -> str | Any:
        entry = self.running.request_cancel(_session(request), tab)
        if entry is None:
            gr.Info("Nothing is running in this tab.")
            return gr.skip()
        if entry.job_id is None:
            return views.status_html("submitting", "Cancelling as soon as the job is created…")
        try:
            job = self.client.cancel(entry.job_id, key=entry.key)
        except ApiError as err:
            gr.Warning(err.readable())
            return gr.skip()
        if job.get("status") == "cancelled":
            return views.status_html("cancelled", "Cancelled", job_id=entry.job_id)
        return views.status_html("running", "Cancelling: the job stops at its next step…", job_id=entry.job_id)

    # ---- connection / role ----
    def connection(self, key: str | None) -> tuple[str, Any, Any, Any, Any]:
        """(connection line, admin tab, t2i model choices, multiref model choices, admin refresh marker)."""
        key = key or None
        parts = [f"Gateway <code>{self.api_url}</code>"]
        admin = False
        choices = [("served default", "")]
        try:
            self.client.health()
            parts.append("reachable")
        except ApiError as err:
            parts.append(f"<b>not reachable</b>: {err.readable()}")
            return " · ".join(parts), gr.Tab(visible=False), gr.skip(), gr.skip(), False
        try:
            admin = self.client.is_admin(key=key)
            if key:
                parts.append("your key: " + ("admin" if admin else "user"))
            elif self.has_default_key:
                parts.append("the UI's key: " + ("admin" if admin else "user"))
            else:
                parts.append("open gateway" if not admin else "open gateway (admin)")
        except ApiError as err:
            parts.append(f"<b>key not accepted</b>: {err.readable()}" if key or self.has_default_key
                         else "<b>no API key</b>: enter yours under Connection")
        try:
            choices += [(m, m) for m in views.model_ids(self.client.models(key=key))]
        except ApiError:
            pass
        return (" · ".join(parts), gr.Tab(visible=admin), gr.Dropdown(choices=choices),
                gr.Dropdown(choices=choices), admin)

    # ---- history ----
    def history(self, key: str | None, status: str) -> tuple[Any, list[dict[str, Any]]]:
        try:
            body = self.client.list_jobs(key=key or None, status=None if status == "any" else status, limit=50)
        except ApiError as err:
            gr.Warning(err.readable())
            return gr.skip(), []
        jobs = views.listing(body)
        rows = [views.job_row(j) for j in jobs] or [["" for _ in views.JOB_COLUMNS]]
        return rows, jobs

    def history_select(self, jobs: list[dict[str, Any]], key: str | None, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, list | tuple) else evt.index
        if row is None or row >= len(jobs):
            return gr.skip(), gr.skip(), gr.skip(), None
        job = jobs[row]
        try:
            job = self.client.get_job(job["id"], key=key or None)
            paths = self._download(job, key or None) if job.get("status") == "succeeded" else []
        except ApiError as err:
            gr.Warning(err.readable())
            return gr.skip(), gr.skip(), gr.skip(), None
        seed = views.job_seed(job)
        info = {"id": job.get("id"), "kind": job.get("kind"), "status": job.get("status"),
                "params": {**(job.get("params") or {}), "seed": seed}, "error": job.get("error"),
                "timings": (job.get("result") or {}).get("timings"), "worker": job.get("worker")}
        return [str(p) for p in paths], [str(p) for p in paths] or None, info, job

    # ---- layout ----
    def build(self) -> gr.Blocks:
        with gr.Blocks(title="Echo-4o demo", analytics_enabled=False,
                       delete_cache=(3600, int(self.cache_ttl_s))) as demo:
            key_state = gr.State("")
            last_seed = gr.State(None)
            with gr.Row(elem_classes="e4o-header"):
                gr.Markdown("# Echo-4o\nText-to-image and multi-reference generation with Echo-4o (BAGEL-7B-MoT).")
            conn = gr.HTML("Connecting…", elem_classes="e4o-conn", elem_id="connection")
            with gr.Accordion("Connection", open=False, elem_id="connection-box"):
                with gr.Row():
                    key_box = gr.Textbox(label="API key", type="password", scale=4, elem_id="api-key",
                                         placeholder="Leave empty to use the key the UI was started with")
                    key_btn = gr.Button("Use this key", scale=1, elem_id="api-key-apply", size="md")

            with gr.Tabs(elem_id="tabs") as tabs:
                with gr.Tab("Text to image", id="t2i", elem_id="tab-t2i"):
                    t2i = self._build_generate_tab(key_state, last_seed)
                with gr.Tab("Multi-reference", id="multiref", elem_id="tab-multiref"):
                    mr = self._build_multiref_tab(key_state, last_seed)
                with gr.Tab("History", id="history", elem_id="tab-history") as history_tab:
                    hist = self._build_history_tab(key_state)
                with gr.Tab("Admin", id="admin", visible=False, elem_id="tab-admin") as admin_tab:
                    refresh_btn, admin_outputs, refresh_all = build_admin_tab(AdminContext(self.client, key_state))

            # connection, role and model list: on load and whenever the key changes
            is_admin = gr.State(False)
            conn_outputs = [conn, admin_tab, t2i["controls"]["model_version"], mr["controls"]["model_version"],
                            is_admin]
            demo.load(self.connection, [key_state], conn_outputs, show_progress="hidden", **PRIVATE)

            def use_key(text: str) -> str:
                return (text or "").strip()

            for trigger in (key_btn.click, key_box.submit):
                trigger(use_key, key_box, key_state, queue=False, **PRIVATE).then(
                    self.connection, [key_state], conn_outputs, show_progress="hidden", **PRIVATE)

            refresh_btn.click(refresh_all, key_state, admin_outputs, **PRIVATE)
            admin_tab.select(refresh_all, key_state, admin_outputs, **PRIVATE)

            # history: load on opening, reuse parameters into the matching tab
            history_tab.select(self.history, [key_state, hist["status"]], [hist["table"], hist["jobs"]], **PRIVATE)
            reuse_outputs = ([tabs, t2i["prompt"], mr["prompt"]] + t2i["controls"].components
                             + mr["controls"].components)

            def reuse(job: dict[str, Any] | None):
                if not job:
                    gr.Info("Select a job in the table first.")
                    return [gr.skip()] * len(reuse_outputs)
                mode = "multiref" if job.get("kind") == "multiref" else "generate"
                params = job.get("params") or {}
                values = control_values_from_params(mode, params, views.job_seed(job))
                target, other = (mr, t2i) if mode == "multiref" else (t2i, mr)
                out = {id(tabs): gr.Tabs(selected="multiref" if mode == "multiref" else "t2i"),
                       id(target["prompt"]): params.get("prompt", "")}
                for name, comp in zip(target["controls"].names, target["controls"].components, strict=True):
                    out[id(comp)] = values[name]
                if mode == "multiref":
                    gr.Info("Parameters reused. Upload the reference images again.")
                return [out.get(id(c), gr.skip()) for c in reuse_outputs]

            hist["reuse"].click(reuse, hist["selected"], reuse_outputs, **PRIVATE)
        return demo

    def _result_column(self, prefix: str) -> dict[str, Any]:
        status = gr.HTML(views.status_html("idle", "Ready"), label="Status", show_label=False,
                         elem_id=f"{prefix}-status")
        preview = gr.Image(label="Live preview", type="pil", interactive=False, visible=False, height=256,
                           elem_id=f"{prefix}-preview")
        gallery = gr.Gallery(label="Result", columns=2, height=520, object_fit="contain", format="png",
                             elem_id=f"{prefix}-gallery", buttons=["download", "fullscreen"])
        files = gr.File(label="Download PNG (generation parameters in its metadata)", file_count="multiple",
                        interactive=False, elem_id=f"{prefix}-files", visible=False)
        with gr.Accordion("Parameters used", open=False):
            params = gr.JSON(label="Parameters", elem_id=f"{prefix}-params")
        return {"status": status, "preview": preview, "gallery": gallery, "files": files, "params": params}

    def _wire(self, tab: str, prompt, controls: Controls, key_state, last_seed, generate_btn, cancel_btn, res,
              submit_fn: Callable[..., dict[str, Any]], extra_inputs: list[Any], extra_names: list[str]) -> None:
        outputs = [res["status"], res["preview"], res["gallery"], res["files"], res["params"], last_seed,
                   controls["seed"]]
        n_extra = len(extra_inputs)

        def handler(request: gr.Request, *args):  # Gradio injects only positional special args
            key, seed_state, text = args[0], args[1], args[2]
            extras = list(args[3:3 + n_extra])
            values = list(args[3 + n_extra:])
            try:
                params = collect_params(controls.names, values, text, seed_state)
            except ApiError as err:
                gr.Warning(err.readable())
                yield views.status_html("error", err.readable()), *[gr.skip()] * 6
                return
            yield from self.run_job(tab, key, lambda: submit_fn(params, *extras, key=key or None), request)

        # Name the parameters, so that the API page and gradio_client show prompt, aspect, num_steps, ...
        names = ["api_key", "last_seed", "prompt", *extra_names, *controls.names]
        handler.__signature__ = inspect.Signature(
            [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request)]
            + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
        inputs = [key_state, last_seed, prompt, *extra_inputs, *controls.components]
        def after(files: list[str] | None):
            """When a job is over: the live preview goes, the download box shows if there are files."""
            return gr.Image(visible=False), gr.File(visible=bool(files))

        generate_btn.click(handler, inputs, outputs, api_name=tab, concurrency_limit=self.concurrency,
                           concurrency_id="jobs", show_progress="hidden").then(
            after, res["files"], [res["preview"], res["files"]], show_progress="hidden", **PRIVATE)
        prompt.submit(handler, inputs, outputs, concurrency_limit=self.concurrency, concurrency_id="jobs",
                      show_progress="hidden", **PRIVATE).then(
            after, res["files"], [res["preview"], res["files"]], show_progress="hidden", **PRIVATE)

        def cancel(request: gr.Request):
            return self.cancel(tab, request)

        cancel_btn.click(cancel, None, res["status"], queue=False, show_progress="hidden", **PRIVATE)

    def _build_generate_tab(self, key_state, last_seed) -> dict[str, Any]:
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox(label="Prompt", lines=3, max_lines=8, elem_id="t2i-prompt",
                                    placeholder="Describe the image…")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="t2i-cancel")
                gr.Examples([[p] for p in TEXT_EXAMPLES], inputs=[prompt], label="Examples")
                controls = build_controls("generate", "t2i")
            with gr.Column(scale=3, min_width=360):
                res = self._result_column("t2i")
        self._wire("generate", prompt, controls, key_state, last_seed, generate_btn, cancel_btn, res,
                   lambda params, key=None: self.client.submit_generate(params, key=key), [], [])
        return {"prompt": prompt, "controls": controls}

    def _build_multiref_tab(self, key_state, last_seed) -> dict[str, Any]:
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                refs = gr.File(label="References: drop images, drag ⋮⋮ to reorder",
                               file_count="multiple", file_types=["image"], allow_reordering=True,
                               elem_id="mr-references", height=200)
                prompt = gr.Textbox(label="Instruction", lines=3, max_lines=8, elem_id="mr-prompt",
                                    placeholder="Say what to make from the references, e.g. 'the cat from image 1 "
                                                "wearing the hat from image 2'")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="mr-generate")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="mr-cancel")
                refs_str = [str(p) for p in self.example_refs]
                gr.Examples([[refs_str, MULTIREF_INSTRUCTIONS[0]], [refs_str[::-1], MULTIREF_INSTRUCTIONS[1]]],
                            inputs=[refs, prompt], label="Examples (references drawn by the UI)",
                            example_labels=["Red ball + blue cube: the ball on the cube, on a beach",
                                            "Blue cube + red ball: side by side in a living room"])
                controls = build_controls("multiref", "mr")
            with gr.Column(scale=3, min_width=360):
                with gr.Row():
                    with gr.Column(scale=1, min_width=160):
                        ref_gallery = gr.Gallery(label="References", columns=1, height=520,
                                                 object_fit="contain", elem_id="mr-ref-gallery",
                                                 interactive=False)
                    with gr.Column(scale=3):
                        res = self._result_column("mr")

        def show_refs(files: list[str] | None):
            return [(f, f"#{i + 1}") for i, f in enumerate(files or [])]

        refs.change(show_refs, refs, ref_gallery, queue=False, show_progress="hidden", **PRIVATE)

        def submit(params: dict[str, Any], files: list[str] | None, key: str | None = None) -> dict[str, Any]:
            if not files:
                raise ApiError("Add at least one reference image", param="images", code="no_references")
            return self.client.submit_multiref(params, list(files), key=key)

        self._wire("multiref", prompt, controls, key_state, last_seed, generate_btn, cancel_btn, res, submit,
                   [refs], ["references"])
        return {"prompt": prompt, "controls": controls, "references": refs}

    def _build_history_tab(self, key_state) -> dict[str, Any]:
        jobs = gr.State([])
        selected = gr.State(None)
        with gr.Row():
            status = gr.Dropdown(["any", "queued", "running", "succeeded", "failed", "cancelled"], value="any",
                                 label="Status", scale=0, min_width=180)
            refresh = gr.Button("Refresh", scale=0, min_width=120, elem_id="history-refresh", size="md")
            gr.Markdown("Your jobs, newest first. Click a row to see it.", elem_classes="e4o-hint")
        table = gr.Dataframe(headers=views.JOB_COLUMNS, interactive=False, elem_id="history-table", wrap=True)
        with gr.Row():
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Images", columns=4, height=300, object_fit="contain", format="png",
                                     elem_id="history-gallery")
            with gr.Column(scale=2):
                reuse = gr.Button("Reuse parameters", variant="primary", elem_id="history-reuse")
                files = gr.File(label="Download PNG (with metadata)", file_count="multiple", interactive=False,
                                elem_id="history-files", height=120)
                info = gr.JSON(label="Job", elem_id="history-job")
        for trigger in (refresh.click, status.change):
            trigger(self.history, [key_state, status], [table, jobs], **PRIVATE)
        table.select(self.history_select, [jobs, key_state], [gallery, files, info, selected], **PRIVATE)
        return {"table": table, "jobs": jobs, "status": status, "reuse": reuse, "selected": selected}


def build_app(api_url: str, api_key: str | None = None, *, concurrency: int = 16) -> gr.Blocks:
    return DemoApp(api_url, api_key, concurrency=concurrency).build()


def launch(api_url: str, api_key: str | None = None, *, host: str = "127.0.0.1", port: int = 7860,
           concurrency: int = 16, max_queue: int = 64) -> None:
    """Serve the demo until interrupted. ``concurrency`` jobs are followed at once (the rest wait in
    Gradio's queue, at most ``max_queue``); the GPU work itself is queued by the gateway."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per gateway call is noise
    app = DemoApp(api_url, api_key, concurrency=concurrency)
    demo = app.build()
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    log.info("demo ui starting", extra={"api": api_url, "host": host, "port": port, "concurrency": concurrency})
    demo.launch(
        server_name=host, server_port=port, theme=THEME, css=views.CSS, show_error=True, ssr_mode=False,
        max_threads=max(40, concurrency * 2 + 8), allowed_paths=[str(app.cache_dir)], quiet=True,
        footer_links=["api", "settings"],
    )
