"""The fields of an A1111 payload, read one by one into this worker's input (``Translation``).

Each of A1111's fields is translated, honoured, or accepted at a value that changes nothing (its neutral value,
or any value when it acts only behind a switch that is off); any other value is refused by name, and ``Fields``
refuses the fields never read as unknown. ``src.schema.a1111`` says which payload is read and how it is answered.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from math import isfinite
from typing import Any

from src.schema.adapters import without_lora_tags
from src.schema.core import canonical_scheduler
from src.schema.passes import HIRES_SIDE_STEP
from src.schema.request import shown

# A1111's API defaults, where they differ from this worker's own.
A1111_DEFAULTS: Mapping[str, Any] = {
    "steps": 50,
    "cfg_scale": 7.0,
    "sampler_name": "Euler",
    "width": 512,
    "height": 512,
    "denoising_strength": 0.75,
    "hr_scale": 2.0,
    "upscaling_resize": 2.0,
}
# The override_settings this worker honours.
A1111_OVERRIDES = (
    "sd_model_checkpoint",
    "sd_vae",
    "CLIP_stop_at_last_layers",
    "pad_cond_uncond",
    "pad_cond_uncond_v0",
    "samples_format",
    "eta_noise_seed_delta",
    "randn_source",
)
# Where this worker draws every noise, by the name of A1111's randn_source setting: each image's own CPU generator,
# seeded with its seed. Its images' parameters say so (``RNG: CPU``), as A1111 writes a source other than its GPU.
A1111_NOISE_SOURCE = "CPU"
# A1111's upscaler names for the files its users bake into UPSCALER_DIR under their own names.
A1111_UPSCALER_NAMES: Mapping[str, str] = {
    "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
    "R-ESRGAN General 4xV3": "realesr-general-x4v3",
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus",
}
# A1111's Extras rounds each side it works out down to a multiple of this (modules/upscaler.py).
A1111_EXTRAS_MULTIPLE = 8
# The ControlNet extension's older names for its resize modes.
_CONTROLNET_RESIZE_ALIASES = {
    "inner fit (scale to fit)": "crop",
    "scale to fit (inner fit)": "crop",
    "outer fit (shrink to fit)": "fill",
    "envelope (outer fit)": "fill",
}
# The ControlNet extension's canny resolution when a unit gives none (processor_res -1).
CANNY_RESOLUTION = 512
_AUTOMATIC = ("", "automatic")
_SAME_SCHEDULE = ("", "use same scheduler")
_SAME = ("", "use same sampler", "use same checkpoint", "none")
_CHECKPOINT_HASH = re.compile(r"\s*\[[0-9a-fA-F]+\]$")


class Fields:
    """A payload's fields as the translation reads them; those it never reads are unknown, and refused."""

    def __init__(self, data: Mapping[str, Any], where: str = "") -> None:
        self.data = data
        self.where = where
        self.read: set[str] = set()
        self.problems: list[str] = []

    def take(self, name: str, default: Any = None) -> Any:
        """The field's value, or ``default`` when it is absent or null (A1111's models read null as unset)."""
        self.read.add(name)
        value = self.data.get(name)
        return default if value is None else value

    def given(self, name: str) -> bool:
        return self.data.get(name) is not None

    def accept(self, *names: str) -> None:
        """Fields read and accepted at any value: they change nothing this worker returns."""
        self.read.update(names)

    def only(self, name: str, neutral: Callable[[Any], bool], why: str) -> None:
        """Accept ``name`` absent, null or at a value ``neutral`` accepts; refuse any other, saying ``why``."""
        value = self.take(name)
        if value is not None and not neutral(value):
            self.refuse(name, value, why)

    def switch(self, name: str, default: bool) -> bool:
        """An A1111 switch (``enable_hr``, ``inpaint_full_res``...): true or false, or 1 or 0; ``default`` when
        absent or null. Any other value (the string "false", say) is refused by name, never read as on or off."""
        value = self.take(name, default)
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        self.refuse(name, value, "must be true or false")
        return default

    def refuse(self, name: str, value: Any, why: str) -> None:
        self.problems.append(f"{self.where}{name}={shown(value)}: {why}")

    def unknown(self, known_note: str) -> None:
        for name in sorted(str(key) for key in set(self.data) - self.read):
            self.problems.append(f"{self.where}{name}: unknown field {known_note}")


def _is_zero(value: Any) -> bool:
    return value == 0 and not isinstance(value, bool)


def _is_false(value: Any) -> bool:
    return value is False or _is_zero(value)


def _is_empty(value: Any) -> bool:
    return value in ("", [], {})


def _names_nothing(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in _SAME


def _upscaler(value: Any) -> Any:
    """A1111's upscaler name as this worker names it; any other value as it came, for the schema to refuse."""
    return A1111_UPSCALER_NAMES.get(value, value) if isinstance(value, str) else value


def _file_name(value: Any) -> Any:
    """A1111's checkpoint or VAE title (``sub\\name.safetensors [6ce0161689]``) as a name of MODELS_DIR or VAE_DIR."""
    if not isinstance(value, str):
        return value
    name = _CHECKPOINT_HASH.sub("", value.strip()).replace("\\", "/")
    return re.sub(r"\.(safetensors|ckpt|pth|pt|bin)$", "", name, flags=re.IGNORECASE)


# A1111's (1.9 and later) own schedule of each sampler, its "Automatic", where the sampler's plain name here runs
# another (modules/sd_samplers_kdiffusion.py's sampler options); DPM++ 2M SDE here runs its own, Exponential.
_OWN_SCHEDULES = {"dpm++ 2m": "DPM++ 2M Karras", "dpm2": "DPM2 Karras", "dpm2 a": "DPM2 a Karras"}
# The samplers that read A1111's eta, and their default (its eta_ancestral, eta_ddim); the others ignore it.
_ETA_DEFAULTS = {
    "euler a": 1,
    "dpm2 a": 1,
    "dpm2 a karras": 1,
    "dpm++ 2m sde": 1,
    "dpm++ 2m sde karras": 1,
    "ddim": 0,
}
# An ancestral sampler at eta 0 adds no noise: it steps as its plain sampler.
_WITHOUT_NOISE = {"euler a": "Euler", "dpm2 a": "DPM2", "dpm2 a karras": "DPM2 Karras"}
# Samplers named with the schedule they run here by their plain name.
_OWN_NAMED = {("dpm++ 2m sde", "exponential")}
# The samplers whose own schedule is A1111's "Uniform", which may be named.
_UNIFORM_SAMPLERS = ("euler", "euler a", "heun", "lms", "dpm2", "dpm2 a", "dpm++ 2m")


def _sampler(sampler: Any, schedule: Any) -> Any:
    """This worker's scheduler for A1111's ``sampler_name`` and ``scheduler`` (its sigma schedule).

    Raises:
        ValueError: the pair is not one this worker has, or the schedule is not a name.
    """
    if schedule is not None and not isinstance(schedule, str):
        raise ValueError(f"scheduler={shown(schedule)}: must be a schedule's name, such as 'Karras' or 'Automatic'")
    if not isinstance(sampler, str):
        return sampler
    key, wanted = sampler.strip().lower(), (schedule or "").strip().lower()
    with contextlib.suppress(ValueError):  # an alias (k_dpmpp_2m) as the name it stands for
        key = canonical_scheduler(sampler).lower()
    if wanted in _AUTOMATIC:
        return _OWN_SCHEDULES.get(key, sampler)
    if key.endswith(wanted) or (key, wanted) in _OWN_NAMED or (wanted == "uniform" and key in _UNIFORM_SAMPLERS):
        return sampler
    try:
        return canonical_scheduler(f"{sampler} {schedule}")
    except ValueError:
        raise ValueError(
            f"{shown(sampler)} with the {shown(schedule)} schedule is not a sampler this worker has; it has Karras "
            "schedules for DPM++ 2M, DPM++ 2M SDE, DPM2, DPM2 a and LMS, Exponential for DPM++ 2M SDE (its own), "
            "Uniform for Euler, Euler a, Heun, LMS, DPM2, DPM2 a and DPM++ 2M, and each sampler's own schedule "
            "('Automatic')"
        ) from None


class Translation:
    """One payload turned into this worker's input, field by field."""

    def __init__(self, endpoint: str, payload: Mapping[str, Any]) -> None:
        self.endpoint = endpoint
        self.fields = Fields(payload)
        self.out: dict[str, Any] = {}
        self.names: dict[str, str] = {}
        # This worker's fields that hold A1111's default, their A1111 field not sent: an error says so.
        self.defaulted: set[str] = set()
        self.notes: list[str] = []

    def copy(self, a1111: str, native: str, default: Any = None) -> None:
        """``a1111`` into ``native``, as it came (A1111's default when absent; this worker's without one)."""
        if default is not None and not self.fields.given(a1111):
            self.defaulted.add(native)
        value = self.fields.take(a1111, default)
        if value is not None:
            self.out[native] = value
        if native != a1111:
            self.names[native] = a1111

    # --- txt2img and img2img ---------------------------------------------------------------------------------

    def generation(self) -> None:
        fields = self.fields
        for name in ("prompt", "negative_prompt", "seed", "subseed", "subseed_strength", "tiling"):
            self.copy(name, name)
        for name in ("width", "height"):
            self.copy(name, name, A1111_DEFAULTS[name])
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            self.copy(name, name)
        self.copy("steps", "num_inference_steps", A1111_DEFAULTS["steps"])
        self.copy("cfg_scale", "guidance_scale", A1111_DEFAULTS["cfg_scale"])
        sampler = self.job_sampler()
        try:
            self.out["scheduler"] = _sampler(sampler, fields.take("scheduler"))
        except ValueError as error:
            fields.refuse("sampler_name", sampler, f"with scheduler: {error}")
        self.names["scheduler"] = "sampler_name"
        self._eta()
        self._batch()
        # As A1111 with disable_extra_networks: the prompt's <lora:...> tags are removed and no network applied.
        if fields.switch("disable_extra_networks", False) and isinstance(self.out.get("prompt"), str):
            self.out["prompt"] = without_lora_tags(self.out["prompt"])
        self._neutral_generation_fields()
        read_overrides(self)
        self._scripts()

    def _eta(self) -> None:
        """A1111's ``eta``, which only its ancestral samplers (default 1) and DDIM (default 0) read: an ancestral
        sampler at eta 0 adds no noise, and is its plain sampler (k-diffusion's sample_euler_ancestral with eta 0
        steps as sample_euler does); any other value those samplers would read is refused."""
        fields, scheduler = self.fields, self.out.get("scheduler")
        eta = fields.take("eta")
        try:
            key = canonical_scheduler(scheduler).lower() if isinstance(scheduler, str) else None
        except ValueError:
            return  # the schema refuses the sampler
        default = _ETA_DEFAULTS.get(key or "")
        if eta is None or default is None or eta == default:
            return  # a sampler that does not read eta, as in A1111, or its default
        if eta == 0 and key in _WITHOUT_NOISE:
            self.out["scheduler"] = _WITHOUT_NOISE[key]
            return
        also = " (or 0, as its plain sampler)" if key in _WITHOUT_NOISE else ""
        fields.refuse("eta", eta, f"{scheduler} runs at eta {default:g} here{also}")

    def job_sampler(self) -> Any:
        """A1111's sampler for the job: ``sampler_name``, else ``sampler_index`` (its older name), else Euler."""
        name, index = self.fields.take("sampler_name"), self.fields.take("sampler_index")
        return name or index or A1111_DEFAULTS["sampler_name"]

    def _batch(self) -> None:
        fields = self.fields
        batch_size, n_iter = fields.take("batch_size", 1), fields.take("n_iter", 1)
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in (batch_size, n_iter)):
            fields.refuse("batch_size", [batch_size, n_iter], "batch_size and n_iter must be integers")
            return
        self.out["num_images"] = batch_size * n_iter
        self.names["num_images"] = "batch_size x n_iter" if n_iter != 1 else "batch_size"

    def _neutral_generation_fields(self) -> None:
        fields = self.fields
        fields.only("styles", _is_empty, "this worker keeps no saved styles: put their text in the prompts")
        fields.only("restore_faces", _is_false, "face restoration (GFPGAN, CodeFormer) is not part of this worker")
        fields.only("s_churn", _is_zero, "stochastic churn is not part of this worker's samplers")
        fields.only("s_min_uncond", _is_zero, "negative guidance minimum sigma is not part of this worker")
        self.copy("token_merging_ratio", "tome_ratio")
        ratio = fields.data.get("token_merging_ratio") or 0
        fields.only(
            "token_merging_ratio_hr",
            lambda value: value in (0, ratio),
            "this worker merges tokens at one ratio in both passes (token_merging_ratio): 0 or that ratio",
        )
        fields.only("firstpass_image", _is_empty, "a first pass's image is not taken: send it as img2img")
        fields.only("infotext", _is_empty, "an infotext is not read: send its values as fields")
        fields.only("refiner_checkpoint", _names_nothing, "a refiner is for SDXL; this worker serves SD 1.5")
        fields.only("script_name", _names_nothing, "A1111's scripts are not part of this worker")
        fields.only("save_images", _is_false, "the worker keeps no files: output_type 's3' stores them in a bucket")
        # They act only with s_churn (0), a refiner, a script or on A1111's own disk and progress bar.
        fields.accept("s_tmin", "s_tmax", "s_noise", "refiner_switch_at", "script_args")
        fields.accept("do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards")
        fields.accept("comments", "force_task_id", "send_images")
        # Not among A1111's API fields (its API leaves it out, and ignores it), but sent by clients built on its
        # processing class; the variation seed fields act here as A1111's API runs them, with extras on.
        fields.accept("seed_enable_extras")

    def _scripts(self) -> None:
        fields = self.fields
        scripts = fields.take("alwayson_scripts", {})
        if not isinstance(scripts, dict):
            fields.refuse("alwayson_scripts", scripts, "must be an object of scripts by name")
            return
        for name, script in scripts.items():
            if str(name).lower() != "controlnet":
                fields.refuse(f"alwayson_scripts.{name}", "...", "this worker runs no A1111 script but ControlNet's")
            elif not isinstance(script, dict) or not isinstance(script.get("args", []), list) or set(script) - {"args"}:
                fields.refuse(f"alwayson_scripts.{name}", script, 'must be {"args": [unit, ...]}')
            else:
                self._controlnet_units(str(name), script.get("args", []))

    def _controlnet_units(self, key: str, args: list[Any]) -> None:
        units: list[dict[str, Any]] = []
        for index, arg in enumerate(args):
            where = f"alwayson_scripts.{key}.args.{index}"
            if not isinstance(arg, dict):
                self.fields.refuse(where, arg, "must be a unit object, as the ControlNet extension's API takes it")
                continue
            size = (self.out.get("width"), self.out.get("height"))
            unit = _ControlNetUnit(arg, f"{where}.", hires=self._hires_on(), size=size)
            if unit.skipped:
                self.notes.append(f"{where}: enabled false, not run (as the ControlNet extension)")
            elif unit.unit is not None:
                at = f"controlnets.{len(units)}"
                self.names.update({f"{at}.{name}": f"{where}.{a1111}" for name, a1111 in unit.names})
                units.append(unit.unit)
            self.fields.problems += unit.fields.problems
        if units:
            self.out["controlnets"] = units
            self.names["controlnets"] = f"alwayson_scripts.{key}.args"

    def _hires_on(self) -> bool:
        return self.endpoint == "txt2img" and self.fields.data.get("enable_hr") in (True, 1)

    def hires(self) -> None:
        """txt2img's hires fix: read when ``enable_hr`` is on, accepted at any value when it is off."""
        fields = self.fields
        names = (
            "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
            "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "denoising_strength",
            "firstphase_width", "firstphase_height",
        )  # fmt: skip
        if not fields.switch("enable_hr", False):
            fields.accept(*names)
            return
        hires: dict[str, Any] = {"strength": fields.take("denoising_strength", A1111_DEFAULTS["denoising_strength"])}
        hires["scale"] = hires_scale(self)
        for a1111, native in (("hr_second_pass_steps", "steps"), ("hr_prompt", "prompt")):
            if (value := fields.take(a1111)) is not None:
                hires[native] = value
        if (negative := fields.take("hr_negative_prompt")) is not None:
            hires["negative_prompt"] = negative
        upscaler = fields.take("hr_upscaler", "Latent")
        hires["upscaler"] = "lanczos" if _names_nothing(upscaler) else _upscaler(upscaler)
        if not _names_nothing(model := fields.take("hr_checkpoint_name", "")):
            hires["model"] = _file_name(model)
        sampler = fields.take("hr_sampler_name", "")
        schedule = fields.take("hr_scheduler", "")
        if not _names_nothing(sampler) or not _names_nothing(schedule):
            base = sampler if not _names_nothing(sampler) else self.job_sampler()
            if schedule is None or (isinstance(schedule, str) and schedule.strip().lower() in _SAME_SCHEDULE):
                schedule = fields.data.get("scheduler") or ""  # the first pass's schedule, as A1111
            try:
                hires["sampler"] = _sampler(base, schedule)
            except ValueError as error:
                fields.refuse("hr_sampler_name", sampler, f"with hr_scheduler: {error}")
        for name in ("firstphase_width", "firstphase_height"):
            fields.only(name, _is_zero, "A1111's old hires sizing is not read: use hr_scale or hr_resize_x/y")
        self.out["hires"] = hires
        self.names.update(
            {
                "hires": "enable_hr",
                "hires.scale": "hr_scale",
                "hires.strength": "denoising_strength",
                "hires.steps": "hr_second_pass_steps",
                "hires.upscaler": "hr_upscaler",
                "hires.model": "hr_checkpoint_name",
                "hires.sampler": "hr_sampler_name",
                "hires.prompt": "hr_prompt",
                "hires.negative_prompt": "hr_negative_prompt",
            }
        )

    def img2img(self) -> None:
        fields = self.fields
        images = fields.take("init_images")
        if not isinstance(images, list) or len(images) != 1:
            fields.refuse(
                "init_images", images if images is not None else "(none)", "must be a list of one base64 image"
            )
        else:
            self.out["image"], self.names["image"] = images[0], "init_images.0"
        self.copy("denoising_strength", "strength", A1111_DEFAULTS["denoising_strength"])
        resize_mode = fields.take("resize_mode", 0)
        if resize_mode == 3:
            fields.refuse("resize_mode", resize_mode, "A1111's latent upscale is not part of this worker: 0, 1 or 2")
        else:
            self.out["resize_mode"] = resize_mode
        fields.only("initial_noise_multiplier", lambda value: value == 1, "this worker's noise is not scaled: only 1")
        fields.only("latent_mask", _is_empty, "a separate latent mask is not taken: send mask")
        # image_cfg_scale acts only on instruct-pix2pix models, which this worker does not serve.
        fields.accept("image_cfg_scale", "include_init_images")
        self._mask()

    def _mask(self) -> None:
        """The inpaint fields: read with a mask, accepted at any value without one (they act only with it)."""
        fields = self.fields
        mask = fields.take("mask")
        blur = fields.take("mask_blur")
        blur_x, blur_y = fields.take("mask_blur_x", 4), fields.take("mask_blur_y", 4)
        fill = fields.take("inpainting_fill", 0)
        full_res = fields.switch("inpaint_full_res", True)
        padding = fields.take("inpaint_full_res_padding", 0)
        invert = fields.take("inpainting_mask_invert", 0)
        rounded = fields.switch("mask_round", True)
        if mask is None:
            return
        self.out["mask"] = mask
        self.out["mask_round"] = rounded
        if blur is None and blur_x != blur_y:
            fields.refuse("mask_blur_x", [blur_x, blur_y], "the mask is blurred alike both ways: mask_blur_x = y")
        self.out["mask_blur"] = blur_x if blur is None else blur
        self.names["mask_blur"] = "mask_blur" if blur is not None else "mask_blur_x"
        fills = {0: "fill", 1: "original", 2: "latent_noise", 3: "latent_nothing"}
        if not isinstance(fill, int | float) or isinstance(fill, bool) or fill not in fills:
            fields.refuse("inpainting_fill", fill, "0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)")
        else:
            self.out["inpaint_fill"], self.names["inpaint_fill"] = fills[int(fill)], "inpainting_fill"
        self.out["inpaint_area"] = "masked" if full_res else "whole"
        self.names["inpaint_area"] = "inpaint_full_res"
        self.copy("inpaint_full_res_padding", "inpaint_padding", padding)
        if invert not in (0, 1):
            fields.refuse("inpainting_mask_invert", invert, "0 (paint the white) or 1 (paint the black)")
        else:
            self.out["mask_invert"], self.names["mask_invert"] = bool(invert), "inpainting_mask_invert"


class _ControlNetUnit:
    """One unit of ``alwayson_scripts.controlnet.args``, as the ControlNet extension's API takes it."""

    def __init__(self, data: Mapping[str, Any], where: str, *, hires: bool, size: tuple[Any, Any]) -> None:
        self.fields = fields = Fields(data, where)
        self.names: list[tuple[str, str]] = []
        self.unit: dict[str, Any] | None = None
        # The extension runs a unit only when enabled; a unit with no `enabled` runs, as in its older API. A unit
        # that does not run is not read either (the extension skips it before it checks a field).
        self.skipped = fields.take("enabled", True) is False
        if self.skipped:
            fields.accept(*(str(name) for name in data))
            return
        image: Any = fields.take("image") or fields.take("input_image")
        mask: Any = fields.take("mask") or fields.take("mask_image")
        if isinstance(image, dict):
            image, mask = image.get("image"), image.get("mask") or mask
        module = str(fields.take("module", "none")).strip().lower()
        unit: dict[str, Any] = {"model": _file_name(fields.take("model", "None"))}
        if image is not None and image != "":  # none: the img2img image, as the extension takes it
            unit["image"] = image
        self.names += [("model", "model"), ("image", "image")]
        for a1111, native in (
            ("weight", "scale"),
            ("guidance_start", "start"),
            ("guidance_end", "end"),
            ("control_mode", "control_mode"),
        ):
            if (value := fields.take(a1111)) is not None:
                unit[native] = value
                self.names.append((native, a1111))
        if (end := fields.take("guidance")) is not None:  # the extension's old name for guidance_end
            unit["end"] = end
        resize = fields.take("resize_mode", "Crop and Resize")
        unit["resize_mode"] = _CONTROLNET_RESIZE_ALIASES.get(str(resize).strip().lower(), resize)
        self.names.append(("resize_mode", "resize_mode"))
        self._module(module, unit, size)
        self._neutral(mask, hires=hires)
        if not self.skipped:
            self.unit = unit

    def _module(self, module: str, unit: dict[str, Any], size: tuple[Any, Any]) -> None:
        fields = self.fields
        low, high = fields.take("threshold_a", -1), fields.take("threshold_b", -1)
        resolution = fields.take("processor_res", -1)
        pixel_perfect = fields.take("pixel_perfect", False)
        if module == "none":
            return  # the sliders act only on a preprocessor
        if module != "canny":
            fields.refuse("module", module, "this worker's preprocessors are none and canny")
            return
        unit["preprocess"] = "canny"
        for name, value, native in (("threshold_a", low, "low"), ("threshold_b", high, "high")):
            if value != -1:
                whole = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
                unit[native] = int(value) if whole else value
                self.names.append((native, name))
        if pixel_perfect is True:
            # The extension's pixel-perfect resolution, for a control image of the job's proportions.
            sides = [side for side in size if isinstance(side, int)]
            unit["processor_res"] = min(sides) if len(sides) == 2 else None
        else:
            unit["processor_res"] = CANNY_RESOLUTION if resolution == -1 else resolution
        self.names.append(("processor_res", "processor_res"))

    def _neutral(self, mask: Any, *, hires: bool) -> None:
        fields = self.fields
        if mask:
            fields.refuse("mask", "...", "a unit's own mask is not taken")
        if hires:
            fields.only("hr_option", lambda value: value == "Both", "this worker's units act in both hires passes")
        fields.accept("hr_option", "low_vram", "lowvram", "save_detected_map", "is_ui", "output_dir", "loopback")
        fields.only("guessmode", _is_false, "guess mode is control_mode 'ControlNet is more important'")
        for name in ("advanced_weighting", "effective_region_mask", "ipadapter_input", "batch_images"):
            fields.only(name, _is_empty, "not part of this worker's ControlNet")
        for name in ("batch_mask_dir", "batch_keyframe_idx", "batch_modifiers", "batch_image_files"):
            fields.only(name, _is_empty, "batch units are not part of this worker")
        fields.only("animatediff_batch", _is_false, "AnimateDiff is not part of this worker")
        fields.only("input_mode", lambda value: str(value).lower() == "simple", "only one image per unit")
        # They act only on IP-Adapter, PuLID and union models, which this worker does not serve, and
        # inpaint_crop_input_image as this worker does (the control image cropped with inpaint_full_res).
        fields.accept("pulid_mode", "union_control_type", "inpaint_crop_input_image")
        fields.unknown("of a ControlNet unit")


# The override_settings taken at one value only: (whether a value is it, the rule that refuses another).
_NEUTRAL_OVERRIDES: Mapping[str, tuple[Callable[[Any], bool], str]] = {
    "eta_noise_seed_delta": (_is_zero, "this worker's noise has no seed delta: only 0"),
    "pad_cond_uncond_v0": (
        lambda value: value is False,
        "this worker pads with empty chunks (pad_cond_uncond), not with the last vector as v0 does: only false",
    ),
    "randn_source": (
        lambda value: value == A1111_NOISE_SOURCE,
        f"this worker draws its noise as A1111's {A1111_NOISE_SOURCE} source does: only {A1111_NOISE_SOURCE!r}",
    ),
}


def read_overrides(self: Translation) -> None:
    fields = self.fields
    overrides = fields.take("override_settings", {})
    if not isinstance(overrides, dict):
        fields.refuse("override_settings", overrides, "must be an object of A1111 settings")
        return
    for name, value in overrides.items():
        where = f"override_settings.{name}"
        if name == "sd_model_checkpoint":
            if not _names_nothing(value):
                self.out["model"], self.names["model"] = _file_name(value), where
        elif name == "sd_vae":
            if not (isinstance(value, str) and value.strip().lower() in ("automatic", "none", "")):
                self.out["vae"], self.names["vae"] = _file_name(value), where
        elif name == "CLIP_stop_at_last_layers":
            self.out["clip_skip"], self.names["clip_skip"] = value, where
        elif name == "pad_cond_uncond":
            self.out["pad_conds"], self.names["pad_conds"] = value, where
        elif name == "samples_format":
            self.out["output_format"], self.names["output_format"] = value, where
        elif name in _NEUTRAL_OVERRIDES:
            neutral, rule = _NEUTRAL_OVERRIDES[name]
            if not neutral(value):
                fields.refuse(where, value, rule)
        else:
            fields.refuse(where, value, f"not a setting this worker takes; it takes {', '.join(A1111_OVERRIDES)}")


def translate_upscale(self: Translation) -> None:
    """An extra-single-image payload as an upscale job, at the size A1111 makes (scripts/postprocessing_upscale.py
    and modules/upscaler.py): by ``upscaling_resize``, each side int(side x factor) rounded down to a multiple of
    8; to ``upscaling_resize_w`` x ``_h`` with ``upscaling_crop``, that size (covered, then cropped); without it,
    the image enlarged to cover it, uncropped, each side rounded down to a multiple of 8."""
    fields = self.fields
    self.out["task"] = "upscale"
    self.copy("image", "image")
    upscaler = fields.take("upscaler_1", "None")
    if _names_nothing(upscaler):
        fields.refuse("upscaler_1", upscaler, "names no upscaler: an upscale job enlarges the image by one")
    else:
        self.out["upscaler"] = _upscaler(upscaler)
    self.names["upscaler"] = "upscaler_1"
    mode = fields.take("resize_mode", 0)
    factor = fields.take("upscaling_resize", A1111_DEFAULTS["upscaling_resize"])
    target = fields.take("upscaling_resize_w", 512), fields.take("upscaling_resize_h", 512)
    crop = fields.switch("upscaling_crop", True)
    if mode == 0 and not isinstance(mode, bool):
        self.out["scale"], self.names["scale"] = factor, "upscaling_resize"
        self.out["multiple_of"] = A1111_EXTRAS_MULTIPLE
    elif mode == 1:
        self.out["width"], self.out["height"] = target
        self.out["resize_mode"] = "crop" if crop else "cover"
        if not crop:
            self.out["multiple_of"] = A1111_EXTRAS_MULTIPLE
        self.names.update(width="upscaling_resize_w", height="upscaling_resize_h", resize_mode="upscaling_crop")
    else:
        fields.refuse("resize_mode", mode, "0 (by upscaling_resize) or 1 (to upscaling_resize_w x _h)")
    second = fields.take("upscaler_2", "None")
    if not _names_nothing(second):
        fields.only("extras_upscaler_2_visibility", _is_zero, "a second upscaler's blend is not taken")
    fields.accept("extras_upscaler_2_visibility")
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        fields.only(name, _is_zero, "face restoration (GFPGAN, CodeFormer) is not part of this worker")
    # They act only with face restoration (0 above).
    fields.accept("codeformer_weight", "upscale_first")
    # A1111 returns a single image whatever it says (it only keeps a batch's results from the answer).
    fields.switch("show_extras_results", True)


# A side no worker reaches (MAX_SIDE is far below it), past which a resize target is not even computed.
_MAX_SIDE_READ = 1_000_000


def hires_scale(self: Translation) -> Any:
    """The factor of this worker's hires pass that gives the size A1111 would: from ``hr_scale``, or from
    ``hr_resize_x`` and ``hr_resize_y`` (one of the two; both when they keep the proportions).

    A1111 enlarges to int(side x hr_scale) (or to the resize target, the other side in proportion) and its latents
    round that down to a multiple of 8: the factor is ``hr_scale`` itself when that lands on multiples of 8, else one
    that lands on A1111's sizes, when a single factor does; else the field is refused.
    """
    fields = self.fields
    scale = fields.take("hr_scale", A1111_DEFAULTS["hr_scale"])
    target_x, target_y = fields.take("hr_resize_x", 0), fields.take("hr_resize_y", 0)
    width, height = self.out.get("width"), self.out.get("height")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        return scale  # the schema refuses the size, naming its field
    if not target_x and not target_y:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not isfinite(width * height * scale):
            return scale  # the schema refuses a bad one, naming hr_scale
        return _factor_for(self, "hr_scale", scale, (int(width * scale), int(height * scale))) or scale
    if not all(
        isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_SIDE_READ
        for value in (target_x, target_y)
    ):
        fields.refuse("hr_resize_x", [target_x, target_y], "must be whole pixels, with width and height")
        return scale
    wanted = (target_x, target_x * height // width) if target_x else (target_y * width // height, target_y)
    if target_x and target_y and wanted != (target_x, target_y):
        fields.refuse(
            "hr_resize_x",
            [target_x, target_y],
            f"hr_resize_x x hr_resize_y = {target_x}x{target_y} does not keep {width}x{height}'s proportions; "
            "this worker's hires pass enlarges by one factor and crops nothing: use hr_scale, or one of the two",
        )
        return scale
    return _factor_for(self, "hr_resize_x" if target_x else "hr_resize_y", None, wanted) or scale


def _factor_for(self: Translation, name: str, scale: float | None, target: tuple[int, int]) -> float | None:
    """The factor that takes width x height to ``target`` rounded down to multiples of 8, as A1111's latents
    round it: ``scale`` when it does; None (the field refused) when no single factor does."""
    width, height = self.out["width"], self.out["height"]
    rounded = (target[0] // HIRES_SIDE_STEP * HIRES_SIDE_STEP, target[1] // HIRES_SIDE_STEP * HIRES_SIDE_STEP)
    # Exact quotients first; half a pixel more, where float rounding puts an exact one a pixel short (960 / 704).
    candidates = (rounded[0] / width, rounded[1] / height, (rounded[0] + 0.5) / width, (rounded[1] + 0.5) / height)
    for factor in (scale, *candidates):
        if factor is not None and (int(width * factor), int(height * factor)) == rounded:
            return factor
    self.fields.refuse(
        name,
        self.fields.data.get(name),
        f"A1111 would make {rounded[0]}x{rounded[1]} of {width}x{height}, which no single factor of this worker's "
        "hires pass reaches; choose a size in the first pass's proportions",
    )
    return None
