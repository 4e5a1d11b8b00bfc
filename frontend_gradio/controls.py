"""The generation form: controls built from the gateway's ``GET /parameters``, and the two conversions
between control values and a job's request fields.

* :meth:`Form.build` creates the Gradio controls of one tab, with the bounds, choices and starting values
  the gateway answered (limits, aspect-ratio presets, renorm types, the mode's defaults).
* :meth:`Form.request` turns the controls' values into the body of ``POST /generate`` or ``POST /multiref``.
* :meth:`Form.values_from_params` turns a past job's stored params back into control values ("Reuse
  parameters"); ``request(values_from_params(p))`` sends the same request again.

The job facts come from the gateway only; the constants here are notions of the form itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from frontend_gradio.client import ApiError

CUSTOM = "custom"  # aspect choice: height and width sliders
FOLLOW_REF = "follow reference"  # aspect choice of multiref: no size, the output follows the last reference
SEED_MODES = ["random", "fixed", "reuse last"]
# Every event but the two Generate buttons is internal: hidden from the API page and from gradio_client.
PRIVATE: dict[str, Any] = {"api_visibility": "private"}
# Slider steps of the float controls (how finely a person sets them; the gateway bounds the values).
SCALE_STEP = 0.1
FRACTION_STEP = 0.05

#: Names of the form's controls, in the order of their components (and of the API endpoints' parameters).
CONTROL_NAMES = ["aspect", "height", "width", "num_images", "num_steps", "seed_mode", "seed", "cfg_text_scale",
                 "cfg_img_scale", "interval_low", "interval_high", "cfg_renorm_type", "cfg_renorm_min",
                 "timestep_shift", "model_version"]


@dataclass
class Controls:
    """A tab's form components, by name (``names[i]`` names ``components[i]``)."""

    names: list[str] = field(default_factory=list)
    components: list[Any] = field(default_factory=list)

    def add(self, name: str, component: Any) -> Any:
        self.names.append(name)
        self.components.append(component)
        return component

    def __getitem__(self, name: str) -> Any:
        return self.components[self.names.index(name)]


@dataclass(frozen=True)
class Form:
    """The form of one image job kind (``mode``: "generate" or "multiref"), from the ``GET /parameters``
    answer ``parameters`` (``backend.schemas.JobParameters`` as JSON)."""

    mode: str
    parameters: dict[str, Any]

    def __post_init__(self) -> None:
        if self.mode not in self.parameters.get("defaults", {}):
            raise ValueError(f"the gateway's /parameters has no defaults for {self.mode!r}; it has "
                             f"{sorted(self.parameters.get('defaults', {}))} (is the UI older than the gateway?)")

    # --- facts, as the gateway answered them --------------------------------------------------------
    @property
    def limits(self) -> dict[str, Any]:
        return self.parameters["limits"]

    @property
    def job_defaults(self) -> dict[str, Any]:
        """What the gateway applies to a job of this mode that leaves a field out."""
        return self.parameters["defaults"][self.mode]

    @property
    def presets(self) -> dict[str, tuple[int, int]]:
        """Aspect-ratio preset name -> (height, width)."""
        return {name: (int(h), int(w)) for name, (h, w) in self.parameters["aspect_ratios"].items()}

    def default_aspect(self) -> str:
        """The aspect choice matching the mode's default size: the preset of that size, ``custom`` for another
        size, ``follow reference`` when the mode has no default size (multiref)."""
        d = self.job_defaults
        if d["height"] is None or d["width"] is None:
            return FOLLOW_REF
        for name, size in self.presets.items():
            if size == (d["height"], d["width"]):
                return name
        return CUSTOM

    def default_values(self) -> dict[str, Any]:
        """Every control's starting value: the mode's defaults; the custom size starts at the largest side."""
        d = self.job_defaults
        side = self.limits["side_max"]
        return {
            "aspect": self.default_aspect(),
            "height": d["height"] or side,
            "width": d["width"] or side,
            "num_images": d["num_images"],
            "num_steps": d["num_steps"],
            "seed_mode": SEED_MODES[0],
            "seed": 0,
            "cfg_text_scale": d["cfg_text_scale"],
            "cfg_img_scale": d["cfg_img_scale"],
            "interval_low": d["cfg_interval"][0],
            "interval_high": d["cfg_interval"][1],
            "cfg_renorm_type": d["cfg_renorm_type"],
            "cfg_renorm_min": d["cfg_renorm_min"],
            "timestep_shift": d["timestep_shift"],
            "model_version": "",
        }

    # --- controls -> request fields ------------------------------------------------------------------
    def request(self, values: dict[str, Any], prompt: str | None, last_seed: int | None) -> dict[str, Any]:
        """The request body from the controls' values (``echo4o.jobs.GenerateJob`` / ``MultirefJob`` fields).

        A preset sends ``aspect_ratio``, ``custom`` sends height and width, ``follow reference`` no size. The
        seed is sent for ``fixed`` and ``reuse last`` only (the gateway draws one otherwise); ``reuse last``
        without a last seed raises :class:`ApiError` naming the field ``seed``.
        """
        v = values
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
        elif v["aspect"] in self.presets:
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

    # --- a past job's params -> control values -------------------------------------------------------
    def values_from_params(self, params: dict[str, Any], seed: Any) -> dict[str, Any]:
        """Control values that make :meth:`request` send ``params`` again (with ``seed`` fixed, if known).

        A field missing from ``params`` takes the control's starting value. A size that is one of the
        presets goes back as that preset only when the job asked for the preset by name.
        """
        start = self.default_values()
        if params.get("aspect_ratio") in self.presets:
            aspect = params["aspect_ratio"]
        elif params.get("height") and params.get("width"):
            aspect = CUSTOM
        else:
            aspect = start["aspect"]
        interval = params.get("cfg_interval") or (start["interval_low"], start["interval_high"])
        known_seed = seed not in (None, "")
        values = {name: params[name] if params.get(name) is not None else start[name]
                  for name in ("height", "width", "num_images", "num_steps", "cfg_text_scale", "cfg_img_scale",
                               "cfg_renorm_type", "cfg_renorm_min", "timestep_shift")}
        return {
            **values,
            "aspect": aspect,
            "seed_mode": "fixed" if known_seed else "random",
            "seed": int(seed) if known_seed else 0,
            "interval_low": interval[0],
            "interval_high": interval[1],
            "model_version": params.get("model_version") or "",
        }

    # --- the Gradio components -----------------------------------------------------------------------
    def build(self, prefix: str) -> Controls:
        """Create the controls inside the current Gradio context; ``prefix`` starts their ``elem_id``s."""
        lim, d = self.limits, self.default_values()
        c = Controls()
        aspects = ([FOLLOW_REF] if self.job_defaults["height"] is None else []) + [
            (f"{a}  ({h}×{w})", a) for a, (h, w) in self.presets.items()] + [CUSTOM]
        c.add("aspect", gr.Radio(aspects, value=d["aspect"], label="Aspect ratio", elem_id=f"{prefix}-aspect"))
        side = {"minimum": lim["side_min"], "maximum": lim["side_max"], "step": lim["side_multiple"]}
        with gr.Row(visible=d["aspect"] == CUSTOM) as size_row:
            c.add("height", gr.Slider(value=d["height"], label="Height", elem_id=f"{prefix}-height", **side))
            c.add("width", gr.Slider(value=d["width"], label="Width", elem_id=f"{prefix}-width", **side))
        c["aspect"].change(lambda a: gr.Row(visible=a == CUSTOM), c["aspect"], size_row, queue=False,
                           show_progress="hidden", **PRIVATE)
        with gr.Row():
            c.add("num_images", gr.Slider(1, lim["num_images_max"], value=d["num_images"], step=1, label="Images",
                                          elem_id=f"{prefix}-num-images"))
            c.add("num_steps", gr.Slider(lim["steps_min"], lim["steps_max"], value=d["num_steps"], step=1,
                                         label="Steps", elem_id=f"{prefix}-steps"))
        with gr.Row(equal_height=True):
            c.add("seed_mode", gr.Radio(SEED_MODES, value=d["seed_mode"], label="Seed",
                                        elem_id=f"{prefix}-seed-mode", scale=2))
            c.add("seed", gr.Number(d["seed"], label="Seed value", precision=0, minimum=0, maximum=lim["seed_max"],
                                    elem_id=f"{prefix}-seed", scale=1))
        with gr.Accordion("Guidance and sampler", open=False):
            with gr.Row():
                c.add("cfg_text_scale", gr.Slider(0.0, lim["scale_max"], value=d["cfg_text_scale"], step=SCALE_STEP,
                                                  label="Text CFG scale", elem_id=f"{prefix}-cfg-text"))
                c.add("cfg_img_scale", gr.Slider(0.0, lim["scale_max"], value=d["cfg_img_scale"], step=SCALE_STEP,
                                                 label="Image CFG scale", elem_id=f"{prefix}-cfg-img"))
            with gr.Row():
                c.add("interval_low", gr.Slider(0.0, 1.0, value=d["interval_low"], step=FRACTION_STEP,
                                                label="CFG interval from", elem_id=f"{prefix}-interval-low"))
                c.add("interval_high", gr.Slider(0.0, 1.0, value=d["interval_high"], step=FRACTION_STEP,
                                                 label="CFG interval to", elem_id=f"{prefix}-interval-high"))
            with gr.Row():
                c.add("cfg_renorm_type", gr.Dropdown(self.parameters["renorm_types"], value=d["cfg_renorm_type"],
                                                     label="CFG renorm", elem_id=f"{prefix}-renorm-type"))
                c.add("cfg_renorm_min", gr.Slider(0.0, lim["renorm_min_max"], value=d["cfg_renorm_min"],
                                                  step=FRACTION_STEP, label="Renorm floor",
                                                  elem_id=f"{prefix}-renorm-min"))
                # the shift must be > 0: the slider starts one step above it
                c.add("timestep_shift", gr.Slider(SCALE_STEP, lim["shift_max"], value=d["timestep_shift"],
                                                  step=SCALE_STEP, label="Timestep shift", elem_id=f"{prefix}-shift"))
            c.add("model_version", gr.Dropdown([("served default", "")], value=d["model_version"],
                                               label="Model version", elem_id=f"{prefix}-model"))
        assert c.names == CONTROL_NAMES, c.names  # the endpoints' parameter names follow this order
        return c
