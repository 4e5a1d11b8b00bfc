"""The demo's page: its layout, and the wiring of each tab to the gateway. A client of the gateway's HTTP API
(``frontend_gradio.client``), nothing else.

``build_app(api_url, api_key)`` returns the Blocks; ``launch(...)`` serves them (``echo4o ui``). The page is
built from the gateway's ``GET /parameters`` (``frontend_gradio.controls``), so the gateway must answer when
the app is built. Jobs are followed by ``frontend_gradio.follower``, whose named updates are turned into
component updates here. Each browser session may enter its own API key; without one it uses the key the UI
was started with. The admin tab is shown only while the session's key is an admin key.
"""

from __future__ import annotations

import inspect
import logging
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from echo4o.logging import get_logger
from frontend_gradio import views
from frontend_gradio.admin import ANY_STATUS, AdminContext, build_admin_tab
from frontend_gradio.client import ApiError, GatewayClient
from frontend_gradio.controls import PRIVATE, Controls, Form
from frontend_gradio.examples import MULTIREF_INSTRUCTIONS, TEXT_EXAMPLES, write_reference_examples
from frontend_gradio.follower import KEEP, JobFollower, JobUpdate
from frontend_gradio.results import CACHE_TTL_S, ResultCache

log = get_logger(__name__)

THEME = gr.themes.Soft(
    primary_hue="indigo",
    secondary_hue="slate",
    # System fonts: the page loads nothing from outside the UI's own server.
    font=["ui-sans-serif", "system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"],
)

#: The result column's components, in the order a Generate handler answers them.
RESULT_OUTPUTS = ["status", "preview", "gallery", "files", "params", "last_seed", "seed"]


def _session(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or uuid.uuid4().hex


def result_outputs(update: JobUpdate) -> tuple[Any, ...]:
    """The follower's update as values for :data:`RESULT_OUTPUTS`: ``KEEP`` becomes ``gr.skip()``; the last
    update of a job carries plain values, since it is what API clients (gradio_client) get back."""
    skip = gr.skip()

    def keep_or(value: Any, convert: Callable[[Any], Any] = lambda v: v) -> Any:
        return skip if value is KEEP else convert(value)

    if update.final:
        preview = keep_or(update.preview)
        files = keep_or(update.files)
    else:  # while a job runs, the preview shows when there is one and the (empty) download box hides
        preview = keep_or(update.preview, lambda img: gr.Image(value=img, visible=img is not None))
        files = keep_or(update.files, lambda f: gr.File(value=f, visible=bool(f)))
    seed = keep_or(update.seed)
    return (update.status_html(), preview, keep_or(update.gallery), files, keep_or(update.params), seed,
            skip if seed is None else seed)


class DemoApp:
    """Holds the gateway client, the job follower and the result cache; builds the Blocks."""

    def __init__(self, api_url: str, api_key: str | None = None, *, concurrency: int = 16,
                 cache_dir: Path | None = None, cache_ttl_s: float = CACHE_TTL_S) -> None:
        self.client = GatewayClient(api_url, api_key)
        self.api_url = api_url
        self.has_default_key = bool(api_key)
        self.concurrency = concurrency
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="echo4o-ui-"))
        self.cache_ttl_s = cache_ttl_s
        self.results = ResultCache(self.client, self.cache_dir, cache_ttl_s)
        self.follower = JobFollower(self.client, self.results)
        self.example_refs = write_reference_examples(self.cache_dir / "examples")

    # ---- generation ----
    def run_job(self, tab: str, key: str | None, submit: Callable[[], dict[str, Any]],
                request: gr.Request | None) -> Iterator[tuple[Any, ...]]:
        """Submit, follow the job, yield values for :data:`RESULT_OUTPUTS` (toasts for warnings)."""
        for update in self.follower.follow(_session(request), tab, key or None, submit):
            if update.warning:
                gr.Warning(update.warning)
            yield result_outputs(update)

    def cancel(self, tab: str, request: gr.Request | None) -> str | Any:
        """The Cancel button: the status line after asking the gateway to cancel this tab's job."""
        try:
            update = self.follower.cancel(_session(request), tab)
        except ApiError as err:
            gr.Warning(err.readable())
            return gr.skip()
        if update is None:
            gr.Info("Nothing is running in this tab.")
            return gr.skip()
        return update.status_html()

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
            body = self.client.list_jobs(key=key or None, status=None if status == ANY_STATUS else status,
                                         limit=50)
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
            paths = self.results.download(job, key or None) if (job.get("result") or {}).get("images") else []
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
        """The page. Asks the gateway for its job parameters first (raises :class:`ApiError` if it cannot)."""
        parameters = self.client.parameters()
        self.forms = {mode: Form(mode, parameters) for mode in ("generate", "multiref")}
        self.statuses = list(parameters["statuses"])
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
                    refresh_btn, admin_outputs, refresh_all = build_admin_tab(
                        AdminContext(self.client, key_state, self.statuses))

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
                values = self.forms[mode].values_from_params(params, views.job_seed(job))
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
        """Connect a tab's Generate (button and Enter in the prompt) and Cancel to the gateway; ``tab`` is the
        job kind, and the name of its API endpoint."""
        form = self.forms[tab]
        components = {**res, "last_seed": last_seed, "seed": controls["seed"]}
        outputs = [components[name] for name in RESULT_OUTPUTS]
        n_extra = len(extra_inputs)

        def handler(request: gr.Request, *args):  # Gradio injects only positional special args
            key, seed_state, text = args[0], args[1], args[2]
            extras = list(args[3:3 + n_extra])
            values = list(args[3 + n_extra:])
            try:
                params = form.request(dict(zip(controls.names, values, strict=True)), text, seed_state)
            except ApiError as err:
                gr.Warning(err.readable())
                yield result_outputs(JobUpdate("error", err.readable()))
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
                controls = self.forms["generate"].build("t2i")
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
                controls = self.forms["multiref"].build("mr")
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
            status = gr.Dropdown([ANY_STATUS, *self.statuses], value=ANY_STATUS, label="Status", scale=0,
                                 min_width=180, elem_id="history-status")
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
    """The demo's Blocks against the gateway at ``api_url``. Raises :class:`ApiError` (naming the URL and the
    fix) when the gateway does not answer ``GET /parameters``."""
    return DemoApp(api_url, api_key, concurrency=concurrency).build()


def launch(api_url: str, api_key: str | None = None, *, host: str = "127.0.0.1", port: int = 7860,
           concurrency: int = 16, max_queue: int = 64) -> None:
    """Serve the demo until interrupted. ``concurrency`` jobs are followed at once (the rest wait in
    Gradio's queue, at most ``max_queue``); the GPU work itself is queued by the gateway. Exits with the
    gateway error's sentence (status 1) when the gateway cannot be asked for its parameters."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per gateway call is noise
    app = DemoApp(api_url, api_key, concurrency=concurrency)
    try:
        demo = app.build()
    except ApiError as err:
        raise SystemExit(f"error: the demo UI cannot be built: {err.readable()}") from err
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    log.info("demo ui starting", extra={"api": api_url, "host": host, "port": port, "concurrency": concurrency})
    demo.launch(
        server_name=host, server_port=port, theme=THEME, css=views.CSS, show_error=True, ssr_mode=False,
        max_threads=max(40, concurrency * 2 + 8), allowed_paths=[str(app.cache_dir)], quiet=True,
        footer_links=["api", "settings"],
    )
