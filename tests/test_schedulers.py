"""Schedulers: the table-driven numpy schedulers against diffusers, step by step.

The equivalence tests run a whole denoising trajectory through both the diffusers scheduler (torch, float32:
``set_timesteps``, ``scale_model_input``, ``step``) and sdengine's tables + :func:`step`, each side feeding
its own samples to a deterministic nonlinear fake UNet, so any error compounds. Timesteps, the UNet input and
every intermediate sample are compared. Stochastic schedulers get the very noise tensors diffusers draws:
diffusers steps with one ``torch.Generator`` and a second one with the same seed replays its draws.
Image-to-image trajectories slice the diffusers scheduler with ``StableDiffusionImg2ImgPipeline``'s own
``get_timesteps`` and start from its ``add_noise``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from sdengine.errors import InvalidArgumentError, UnknownSchedulerError, UnsupportedConfigError
from sdengine.schedulers import (
    SCHEDULER_NAMES,
    CustomSteps,
    Schedule,
    SchedulerConfig,
    custom_steps,
    diffusers_scheduler_class,
    initial_history,
    load_scheduler,
    step,
    tables,
)
from sdengine.schedulers.base import CUSTOM_TAKERS as TAKERS_NAMED
from sdengine.schedulers.custom import KINDS, PRESETS, parse_custom

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from sdengine.baseline import diffusers_takes, sigmas_in_place  # noqa: E402

diffusers_logging.set_verbosity_error()
# diffusers 0.42 under numpy 2 warns on every set_timesteps (np.array of a tensor without ``copy``).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# --- checkpoint configs (scheduler_config.json as published) ---

#: runwayml/stable-diffusion-v1-5: PNDM, leading spacing, steps_offset 1 (Euler/DPM default to linspace).
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
#: stabilityai/stable-diffusion-2-1 (768, v_prediction DDIM), with linspace spacing for every class.
SD21 = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "linspace",
    "trained_betas": None,
}
#: stabilityai/stable-diffusion-xl-base-1.0: Euler, leading spacing for every class.
SDXL = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
#: SDXL with zero-terminal-SNR betas and trailing spacing (Lin et al. 2023's recommended setup).
SDXL_ZSNR = {**SDXL, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}

BASE_CONFIGS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL, "sdxl_zsnr": SDXL_ZSNR}

#: The diffusers construction each name stands for: ``getattr(diffusers, cls).from_config(config, **kw)``.
DIFFUSERS_EQUIVALENT: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "heun_karras": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "lcm": ("LCMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc_karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
}
SPACINGS = ("karras", "exponential", "beta")
# each ``_karras`` name sets the other spacings off; each ``_exponential``/``_beta`` name is its family with
# that spacing on and the others off
for _name, (_cls, _kw) in list(DIFFUSERS_EQUIVALENT.items()):
    if _name.endswith("_karras"):
        _family = _name.removesuffix("_karras")
        _plain = {k: v for k, v in _kw.items() if k != "use_karras_sigmas"}
        for _spacing in SPACINGS:
            flags = {f"use_{s}_sigmas": s == _spacing for s in SPACINGS}
            DIFFUSERS_EQUIVALENT[f"{_family}_{_spacing}"] = (_cls, {**_plain, **flags})


def family(name: str) -> str:
    """The scheduler a name is, whatever its sigma spacing: ``heun`` for ``heun_karras``."""
    for spacing in SPACINGS:
        name = name.removesuffix(f"_{spacing}")
    return name


# Tolerances, applied to every compared tensor as |ours - ref| <= TOL |ref| + TOL * scale, where scale is
# max(1, max |sample entering the step|): float32 evaluation of x + c * (...) has an absolute rounding error
# proportional to |x|.
TOL = 1e-5
# Schedules with a huge sigma_max (4096 with zero terminal SNR, 20291 for squaredcos_cap_v2): diffusers' first
# Euler step x + d * (sigma' - sigma) cancels a ~1e4 sample down to ~10 in float32 (sigma' - sigma itself is a
# float32 difference), leaving an absolute error of ~1e-3 that every later, small, sample inherits. There,
# diffusers' arithmetic runs in float64 (its tables stay float32) and the tolerance is 1e-4; zero-SNR tables
# also differ by up to ~4e-5 (relative) because diffusers rescales the betas in float32, see
# test_zero_snr_rescale_is_diffusers_formula_in_float64.
HUGE_SIGMA_TOL = 1e-4


def tolerance(config: dict[str, Any]) -> tuple[float, Any]:
    """(tolerance, diffusers arithmetic dtype) for a config."""
    if config.get("rescale_betas_zero_snr") or config.get("beta_schedule") == "squaredcos_cap_v2":
        return HUGE_SIGMA_TOL, torch.float64
    return TOL, torch.float32


#: Combinations sdengine refuses because diffusers' result is not finite there (checked below).
NONFINITE_IN_DIFFUSERS = {("ddim", "sdxl_zsnr", "epsilon"), ("lcm", "sdxl_zsnr", "epsilon")}
#: Combinations where diffusers itself fails: Karras sigmas above the zero-SNR training range round to the
#: timestep 999 twice, diffusers' ``index_for_timestep`` then starts at index 1 and runs off the table (the
#: SDE variant shares DPM-Solver's timesteps; test_matches_diffusers checks the IndexError).
DIFFUSERS_INDEX_ERROR = {("dpmpp_2m_karras", "sdxl_zsnr", 25), ("dpmpp_2m_sde_karras", "sdxl_zsnr", 25)}
#: The same doubled first timestep (999; 998 for exponential sigmas, whose int64 cast truncates), where
#: diffusers does not fail but runs on from its second sigma (its ``index_for_timestep`` takes the second of
#: two matches): sdengine keeps the schedule's own first step.
DIFFUSERS_SKIPS_FIRST_SIGMA = {
    ("unipc_karras", "sdxl_zsnr", 25),
    ("dpmpp_2m_exponential", "sdxl_zsnr", 25),
    ("dpmpp_2m_sde_exponential", "sdxl_zsnr", 25),
    ("unipc_exponential", "sdxl_zsnr", 25),
    # beta sigmas crowd at the top of the range: doubled at 4 steps too
    *(
        (name, "sdxl_zsnr", steps)
        for name in ("dpmpp_2m_beta", "dpmpp_2m_sde_beta", "unipc_beta")
        for steps in (4, 25)
    ),
}

SHAPE = (2, 4, 8, 8)
SEED = 1234


def fake_unet(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic model output, nonlinear in the UNet input and the timestep."""
    x = np.asarray(x, dtype=np.float32)
    t = np.float32(t)
    out = np.tanh(x * np.float32(0.7) + np.float32(0.3)) * (np.float32(0.5) + t / np.float32(1000))
    return (out + np.float32(0.1) * np.sin(t * np.float32(0.01) + x)).astype(np.float32)


#: Schedulers whose diffusers ``step`` takes a generator and draws noise from it.
STOCHASTIC = {"euler_a", "lcm", *(f"dpmpp_2m_sde{s}" for s in ("", "_karras", "_exponential", "_beta"))}
#: DPM-Solver's SDE draws on every call, the last included (where a final sigma of 0 gives it weight 0).
DRAWS_EVERY_CALL = STOCHASTIC - {"lcm"}


def diffusers_draws_noise(name: str, i: int, num_calls: int) -> bool:
    """Whether diffusers' ``step`` i draws noise: ancestral Euler and DPM-Solver's SDE always, whatever the
    order, ``lower_order_final`` or ``final_sigmas_type``; LCM except on its last step."""
    return name in DRAWS_EVERY_CALL or (name == "lcm" and i != num_calls - 1)


def diffusers_noise_dtype(name: str, reference_dtype: Any) -> Any:
    """The dtype diffusers draws in: the model output's, but DPM-Solver's ``step`` always draws float32
    (float32 and float64 draws of one generator differ)."""
    return torch.float32 if name.startswith("dpmpp_2m_sde") else reference_dtype


def reference_scheduler(name: str, config: dict[str, Any]):
    class_name, overrides = DIFFUSERS_EQUIVALENT[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def diffusers_trajectory(name: str, config: dict[str, Any], steps: int):
    """diffusers' final sample alone (for the cases that cannot be compared)."""
    ref = reference_scheduler(name, config)
    ref.set_timesteps(steps)
    x = torch.ones(SHAPE)
    generator = torch.Generator().manual_seed(SEED)
    kwargs = {"generator": generator} if name in STOCHASTIC else {}
    for t in ref.timesteps:
        output = torch.from_numpy(fake_unet(ref.scale_model_input(x, t).numpy(), float(t)))
        x = ref.step(output, t, x, **kwargs).prev_sample
    return x


def assert_close(ours: np.ndarray, ref: np.ndarray, scale: float, tol: float, what: str) -> None:
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol * max(1.0, scale), err_msg=what)


@functools.cache
def img2img_pipeline_class():
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline


def img2img_timesteps(ref, steps: int, strength: float) -> tuple[torch.Tensor, int]:
    """(timesteps, t_start) of diffusers' img2img pipeline for a scheduler after ``set_timesteps(steps)``:
    its own ``get_timesteps`` (which slices ``timesteps[t_start * order:]`` and calls ``set_begin_index``)."""
    pipeline = SimpleNamespace(scheduler=ref)  # get_timesteps reads nothing else
    timesteps, denoising = img2img_pipeline_class().get_timesteps(pipeline, steps, strength, "cpu")
    return timesteps, steps - denoising


def run_both(
    name: str,
    config: dict[str, Any],
    steps: int,
    schedule: Schedule | None = None,
    strength: float | None = None,
    inpaint: bool = False,
    custom: CustomSteps | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the trajectory through diffusers and sdengine, asserting agreement at every step.

    ``strength=None`` is text-to-image (initial noise times ``init_noise_sigma``); a strength is
    image-to-image as diffusers' ``StableDiffusionImg2ImgPipeline`` runs it: the scheduler sliced by the
    pipeline's ``get_timesteps``, the first sample ``add_noise(image_latents, noise, timesteps[:1])``.
    ``inpaint`` runs it as ``StableDiffusionInpaintPipeline`` does with a plain 4-channel UNet: pure noise
    at strength 1, and after every step but the last the area outside a mask replaced by the image noised to
    the next timestep (``add_noise`` after the step; ours from ``noise_scales``).

    ``custom``: the run's own timesteps or sigmas, given to both (diffusers' ``set_timesteps(timesteps=...)``
    or ``(sigmas=...)``, or for sigmas its class does not take, :func:`sdengine.baseline.sigmas_in_place`),
    ``steps`` their count of steps.

    Configs with a huge sigma_max run diffusers' arithmetic in float64 (its tables stay float32): there
    diffusers' float32 rounding on the first step, ~1e-7 of a 1e4 sample, would dominate every later step.
    """
    tol, reference_dtype = tolerance(config)
    if schedule is not None:
        plan = schedule
    elif strength is None:
        plan = load_scheduler(name, config, custom).schedule(steps)
    else:
        plan = load_scheduler(name, config, custom).schedule(steps, strength=strength)
    ref = reference_scheduler(name, config)
    if custom is not None and not diffusers_takes(ref, custom.kind):
        ref = sigmas_in_place(ref, custom.values)  # diffusers' Karras path, these sigmas in its place
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(np.unique(ref.sigmas.numpy()), np.unique(np.float32(custom.values)))
    else:
        ref.set_timesteps(
            **({custom.kind: list(custom.values)} if custom else {"num_inference_steps": steps})
        )
    assert plan.num_inference_steps == steps
    assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)

    rng = np.random.default_rng(SEED)
    latents = rng.standard_normal(SHAPE, dtype=np.float32)
    if strength is None:
        ref_timesteps = ref.timesteps
        assert plan.t_start == 0
        x_ref = (torch.from_numpy(latents) * ref.init_noise_sigma).to(reference_dtype)  # as prepare_latents
        x = latents * np.float32(plan.init_noise_sigma)
    else:
        ref_timesteps, t_start = img2img_timesteps(ref, steps, strength)
        assert plan.t_start == t_start
        image = rng.standard_normal(SHAPE, dtype=np.float32) * np.float32(2)  # stand-in VAE latents
        noise = torch.from_numpy(latents).to(reference_dtype)
        if inpaint and strength == 1.0:
            x_ref = noise * ref.init_noise_sigma
            x = latents * np.float32(plan.init_noise_sigma)
        else:
            x_ref = ref.add_noise(torch.from_numpy(image).to(reference_dtype), noise, ref_timesteps[:1])
            a, b = plan.image_noise
            assert type(a) is float and type(b) is float
            x = np.float32(a) * image + np.float32(b) * latents
            assert_close(x, x_ref.numpy(), float(x_ref.abs().max()), tol, f"{name} add_noise (image_noise)")
    if inpaint:
        keep = (rng.random((SHAPE[0], 1, *SHAPE[2:])) < 0.5).astype(np.float32)  # 1: denoised, 0: image
        keep_ref = torch.from_numpy(keep).to(reference_dtype)
    assert plan.timesteps.shape == ref_timesteps.shape
    # (Karras timesteps are interpolated from the training sigmas: zero-SNR ones differ as the tables do)
    t_tol = 1e-6 if tol == TOL else tol
    np.testing.assert_allclose(
        plan.timesteps, ref_timesteps.numpy().astype(np.float32), rtol=t_tol, atol=1e-6
    )

    history = initial_history(plan, SHAPE)
    generator_ref = torch.Generator().manual_seed(SEED)
    generator_ours = torch.Generator().manual_seed(SEED)
    kwargs = {"generator": generator_ref} if name in STOCHASTIC else {}
    for i, t in enumerate(ref_timesteps):
        scale = float(x_ref.abs().max())
        model_input_ref = ref.scale_model_input(x_ref, t)
        model_input = x * plan.input_scale[i]
        assert_close(model_input, model_input_ref.numpy(), scale, tol, f"{name} UNet input, call {i}")
        output_ref = torch.from_numpy(fake_unet(model_input_ref.numpy(), float(t))).to(reference_dtype)
        output = fake_unet(model_input, float(plan.timesteps[i]))
        x_ref = ref.step(output_ref, t, x_ref, **kwargs).prev_sample

        noise = None
        if diffusers_draws_noise(name, i, len(plan.timesteps)):
            dtype = diffusers_noise_dtype(name, reference_dtype)
            noise = randn_tensor(SHAPE, generator=generator_ours, dtype=dtype).numpy()
            noise = noise.astype(np.float32)
        assert not plan.needs_noise[i] or noise is not None, "needs noise diffusers does not draw"
        x, history = step(plan.coeffs[i], x, output, noise if plan.needs_noise[i] else None, history)
        assert x.dtype == np.float32
        if inpaint:  # diffusers' inpaint loop with a 4-channel UNet, and ours from the schedule's table
            proper_ref, proper = torch.from_numpy(image).to(reference_dtype), image
            if i < len(ref_timesteps) - 1:
                proper_ref = ref.add_noise(
                    proper_ref, torch.from_numpy(latents), ref_timesteps[i + 1 : i + 2]
                )
                a, b = plan.noise_scales[i + 1].astype(np.float32)
                proper = a * image + b * latents
            x_ref = (1 - keep_ref) * proper_ref + keep_ref * x_ref
            x = ((1 - keep) * proper + keep * x).astype(np.float32)
        assert_close(x, x_ref.numpy(), scale, tol, f"{name} sample after call {i}")
    return x, x_ref.numpy()


# --- the contract, for every scheduler x prediction type x step count x checkpoint config ---

CASES = [
    pytest.param(name, base, prediction, steps, id=f"{name}-{base}-{prediction}-{steps}")
    for base in BASE_CONFIGS
    for name in SCHEDULER_NAMES
    for prediction in ("epsilon", "v_prediction")
    for steps in (1, 4, 25)
]


@pytest.mark.parametrize(("name", "base", "prediction", "steps"), CASES)
def test_matches_diffusers(name: str, base: str, prediction: str, steps: int) -> None:
    config = {**BASE_CONFIGS[base], "prediction_type": prediction}
    if (name, base, prediction) in NONFINITE_IN_DIFFUSERS:
        with pytest.raises(UnsupportedConfigError, match="rescale_betas_zero_snr"):
            load_scheduler(name, config).schedule(steps)
        with np.errstate(all="ignore"):
            x = diffusers_trajectory(name, config, steps)
        assert not torch.isfinite(x).all()
        return
    if (name, base, steps) in DIFFUSERS_INDEX_ERROR:
        plan = load_scheduler(name, config).schedule(steps)
        assert np.isfinite(plan.coeffs).all() and plan.timesteps[0] == plan.timesteps[1] == 999
        with pytest.raises(IndexError):
            diffusers_trajectory(name, config, steps)
        return
    if (name, base, steps) in DIFFUSERS_SKIPS_FIRST_SIGMA:
        plan = load_scheduler(name, config).schedule(steps)
        assert np.isfinite(plan.coeffs).all() and plan.timesteps[0] == plan.timesteps[1] >= 998
        class_name, overrides = DIFFUSERS_EQUIVALENT[name]
        ref = getattr(diffusers, class_name).from_config(config, **overrides)
        ref.set_timesteps(steps)
        ref._init_step_index(ref.timesteps[0])
        assert ref.step_index == 1
        return
    run_both(name, config, steps)


@pytest.mark.parametrize("base", BASE_CONFIGS)
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_schedule_shapes_and_config(name: str, base: str) -> None:
    config = BASE_CONFIGS[base]
    scheduler = load_scheduler(name, config)
    assert scheduler.name == name
    # The scheduler keeps every key of the checkpoint's JSON (only the class is the converted one).
    own = scheduler.config.to_dict()
    class_name, overrides = DIFFUSERS_EQUIVALENT[name]
    assert own == {**config, "_class_name": class_name, **overrides}
    assert SchedulerConfig.from_dict(own) == scheduler.config
    for steps in (1, 4, 25):
        if (name, base) in {("ddim", "sdxl_zsnr"), ("lcm", "sdxl_zsnr")}:
            break  # epsilon with zero terminal SNR: refused, see test_matches_diffusers
        plan = scheduler.schedule(steps)
        s, k = len(plan.timesteps), plan.history_size
        two_calls = 2 * steps - 1
        calls = {"pndm": steps + 1 if steps > 1 else steps, "heun": two_calls, "dpm2": two_calls}
        assert s == calls.get(family(name), steps)
        assert plan.num_inference_steps == steps
        assert plan.timesteps.dtype == plan.input_scale.dtype == plan.coeffs.dtype == np.float32
        assert plan.input_scale.shape == plan.needs_noise.shape == (s,)
        assert plan.coeffs.shape == (s, 1 + k, 3 + k)
        assert plan.needs_noise.dtype == np.bool_
        histories = {"pndm": 4, "unipc": 3, "heun": 2, "dpm2": 1, "lms": 3}
        assert k == (1 if name.startswith("dpmpp_2m") else histories.get(family(name), 0))
        expected_noise = np.zeros(s, dtype=bool)
        if name in STOCHASTIC:
            # the last ancestral step has sigma_up = 0; LCM's last returns x0; so does DPM-Solver's last
            # SDE step with the base configs' final_sigmas_type="zero" (sigma' = 0: the noise weight is 0)
            expected_noise[:-1] = True
        np.testing.assert_array_equal(plan.needs_noise, expected_noise)
        # (1 linspace Euler step starts at timestep 0: init_noise_sigma is sigma_0 = 0.029, as in diffusers)
        assert isinstance(plan.init_noise_sigma, float) and plan.init_noise_sigma > 0
        assert plan.t_start == 0 and all(type(v) is float for v in plan.image_noise)
        assert not plan.coeffs.flags.writeable and not plan.timesteps.flags.writeable


# --- options and quirks beyond the base configs ---

SIGMA_MIN = {"final_sigmas_type": "sigma_min"}
VARIANTS = [
    # (name, config, steps)
    ("euler", {**SD15, "use_karras_sigmas": True}, 10),
    ("euler", {**SDXL, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, 10),
    ("euler", {**SDXL, "final_sigmas_type": "sigma_min"}, 10),
    ("euler", {**SD21, "timestep_type": "continuous"}, 10),  # c_noise = log(sigma) / 4 timesteps
    ("euler", {**SD15, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 7),
    ("euler_a", {**SD15, "beta_schedule": "squaredcos_cap_v2"}, 10),
    ("ddim", {**SD15, "beta_schedule": "squaredcos_cap_v2"}, 10),
    ("dpmpp_2m", {**SD15, "beta_schedule": "squaredcos_cap_v2"}, 10),
    ("dpmpp_2m", {**SD15, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 20),
    ("dpmpp_2m", {**SD15, "final_sigmas_type": "sigma_min"}, 10),  # lower_order_final < 15 steps
    ("dpmpp_2m", {**SD15, "final_sigmas_type": "sigma_min"}, 20),  # second-order final step
    ("dpmpp_2m", {**SD15, "solver_type": "heun"}, 12),
    ("dpmpp_2m", {**SD15, "euler_at_final": True, "final_sigmas_type": "sigma_min"}, 20),
    ("dpmpp_2m", {**SD15, "lambda_min_clipped": -2.0}, 10),
    ("dpmpp_2m", {**SD15, "_class_name": "UniPCMultistepScheduler", "solver_type": "bh2"}, 10),
    (
        "dpmpp_2m",
        {**SD15, "_class_name": "DEISMultistepScheduler", "algorithm_type": "deis", **SIGMA_MIN},
        10,
    ),
    ("dpmpp_2m", {**SD15, "timestep_spacing": "trailing", "steps_offset": 0}, 15),
    # Timesteps truncated, not rounded (998.99 -> 998); more steps repeat the first timestep, where diffusers
    # breaks (see DIFFUSERS_INDEX_ERROR).
    ("dpmpp_2m_karras", {**SD15, "beta_schedule": "squaredcos_cap_v2"}, 3),
    ("dpmpp_2m_karras", {**SDXL, "sigma_min": 0.1, "sigma_max": 10.0}, 10),  # diffusers reads hidden keys
    ("dpmpp_2m_karras", {**SD21, "rescale_betas_zero_snr": True}, 8),
    ("dpmpp_2m_sde", {**SD15, "solver_type": "heun"}, 12),
    ("dpmpp_2m_sde", {**SD15, "solver_type": "heun", **SIGMA_MIN}, 16),  # second-order heun final step
    ("dpmpp_2m_sde", {**SD15, **SIGMA_MIN}, 10),  # lower_order_final < 15 steps; noise on the last step
    ("dpmpp_2m_sde", {**SD15, **SIGMA_MIN}, 20),  # second-order final step, with noise
    ("dpmpp_2m_sde", {**SD15, "euler_at_final": True, **SIGMA_MIN}, 20),
    ("dpmpp_2m_sde", {**SD15, "lower_order_final": False, **SIGMA_MIN}, 8),
    ("dpmpp_2m_sde", {**SD15, "beta_schedule": "squaredcos_cap_v2"}, 10),
    ("dpmpp_2m_sde", {**SD15, "lambda_min_clipped": -2.0}, 10),
    ("dpmpp_2m_sde", {**SD15, "timestep_spacing": "trailing", "steps_offset": 0}, 15),
    # An ODE DPM-Solver config (or a DEIS one) made stochastic by the name, as from_config(algorithm_type=...)
    (
        "dpmpp_2m_sde",
        {**SD15, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++"},
        10,
    ),
    ("dpmpp_2m_sde", {**SD15, "_class_name": "DEISMultistepScheduler", "algorithm_type": "deis"}, 10),
    ("dpmpp_2m_sde_karras", {**SDXL, "sigma_min": 0.1, "sigma_max": 10.0, **SIGMA_MIN}, 10),
    ("dpmpp_2m_sde_karras", {**SD15, "solver_type": "heun"}, 20),
    ("dpmpp_2m_sde_karras", {**SD15, "beta_schedule": "squaredcos_cap_v2"}, 3),
    ("dpmpp_2m_sde_karras", {**SD21, "rescale_betas_zero_snr": True}, 8),
    ("ddim", {"_class_name": "DDIMScheduler", "clip_sample": False}, 10),  # DDIM defaults, set_alpha_to_one
    ("ddim", {**SD15, "trained_betas": list(np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)}, 10),
    ("pndm", {**SD15, "set_alpha_to_one": True}, 10),
    ("pndm", {**SD15, "timestep_spacing": "trailing"}, 2),
    ("pndm", {**SD15, "timestep_spacing": "linspace"}, 3),
    ("lcm", {**SD15, "original_inference_steps": 20, "timestep_scaling": 5.0}, 7),
    ("lcm", {**SD15, "timestep_scaling": 0.01}, 4),  # makes c_skip (otherwise < 1e-5) matter
    # Keys diffusers marks as defaults of the writing class are dropped: Euler gets its own linspace.
    ("euler", {**SD15, "timestep_spacing": "leading", "_use_default_values": ["timestep_spacing"]}, 10),
    ("unipc", {**SD15, "solver_type": "bh1", **SIGMA_MIN}, 10),  # bh1 is NaN in diffusers with "zero"
    ("unipc", {**SD15, **SIGMA_MIN}, 10),
    ("unipc", {**SD15, "solver_order": 1}, 10),
    ("unipc", {**SD15, "solver_order": 3}, 12),  # UniP-3 / UniC-3 from call 3, then 2 and 1 at the end
    ("unipc", {**SD21, "solver_order": 3, "solver_type": "bh1", **SIGMA_MIN}, 4),
    ("unipc", {**SD15, "solver_order": 3, "lower_order_final": False, **SIGMA_MIN}, 12),
    ("unipc", {**SD15, "disable_corrector": [0, 1, 5]}, 10),  # no corrector at calls 1, 2 and 6
    ("unipc", {**SD15, "solver_order": 3, "disable_corrector": [3]}, 8),
    ("unipc", {**SD15, "use_karras_sigmas": True}, 10),
    ("unipc", {**SDXL, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0, **SIGMA_MIN}, 10),
    ("unipc", {**SD15, "use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2"}, 3),
    ("unipc", {**SD21, "rescale_betas_zero_snr": True, "use_karras_sigmas": True}, 8),
    ("unipc", {**SD15, "beta_schedule": "squaredcos_cap_v2"}, 10),
    ("unipc", {**SD15, "timestep_spacing": "trailing", "steps_offset": 0}, 15),
    ("unipc", {**SD15, "predict_x0": False, **SIGMA_MIN}, 10),  # UniPC on the noise prediction
    ("unipc", {**SD21, "predict_x0": False, "solver_order": 3, "solver_type": "bh1", **SIGMA_MIN}, 9),
    # A DPM-Solver config converted to UniPC: solver_type "midpoint" becomes "bh2".
    ("unipc", {**SD15, "_class_name": "DPMSolverMultistepScheduler", "solver_type": "midpoint"}, 10),
]


@pytest.mark.parametrize(
    ("name", "config", "steps"), VARIANTS, ids=[f"{v[0]}-{i}" for i, v in enumerate(VARIANTS)]
)
def test_variants_match_diffusers(name: str, config: dict[str, Any], steps: int) -> None:
    for prediction in ("epsilon", "v_prediction"):
        run_both(name, {**config, "prediction_type": prediction}, steps)


def test_variants_cover_their_options() -> None:
    """The variant configs do exercise what they claim (guards against a silently ignored option)."""
    squaredcos = load_scheduler("dpmpp_2m_karras", {**SD15, "beta_schedule": "squaredcos_cap_v2"})
    assert squaredcos.schedule(3).timesteps[0] == 998
    clipped = load_scheduler("dpmpp_2m", {**SD15, "lambda_min_clipped": -2.0}).schedule(10)
    assert clipped.timesteps[0] < 990
    karras = load_scheduler("dpmpp_2m_karras", SD15).schedule(10)
    assert not np.array_equal(karras.timesteps, load_scheduler("dpmpp_2m", SD15).schedule(10).timesteps)
    # Second-order last step: the previous-x0 history column is used on the final row.
    final2 = load_scheduler("dpmpp_2m", {**SD15, "final_sigmas_type": "sigma_min"}).schedule(20)
    assert final2.coeffs[-1, 0, 3] != 0
    final1 = load_scheduler("dpmpp_2m", {**SD15, "final_sigmas_type": "sigma_min"}).schedule(10)
    assert final1.coeffs[-1, 0, 3] == 0


def test_sde_variants_cover_their_options() -> None:
    """DPM-Solver's SDE: noise on every row but a last one to sigma 0, its own weights on x and x0 (not the
    ODE's), heun's D1 weight distinct from midpoint's, and the options' first-order last steps."""
    sde = load_scheduler("dpmpp_2m_sde", {**SD15, **SIGMA_MIN}).schedule(20)
    ode = load_scheduler("dpmpp_2m", {**SD15, **SIGMA_MIN}).schedule(20)
    assert sde.needs_noise.all() and not ode.needs_noise.any()
    assert sde.coeffs[-1, 0, 3] != 0  # second-order final step
    assert not np.allclose(sde.coeffs[:, 0, :2], ode.coeffs[:, 0, :2], rtol=1e-2)
    np.testing.assert_array_equal(sde.coeffs[:, 1], ode.coeffs[:, 1])  # the same x0 kept as history
    zero = load_scheduler("dpmpp_2m_sde", SD15).schedule(20)
    assert zero.needs_noise[:-1].all() and not zero.needs_noise[-1]
    np.testing.assert_array_equal(
        zero.coeffs[-1, 0], load_scheduler("dpmpp_2m", SD15).schedule(20).coeffs[-1, 0]
    )
    heun = load_scheduler("dpmpp_2m_sde", {**SD15, "solver_type": "heun"}).schedule(12)
    midpoint = load_scheduler("dpmpp_2m_sde", SD15).schedule(12)
    assert not np.allclose(heun.coeffs[1:-1, 0, 3], midpoint.coeffs[1:-1, 0, 3], rtol=1e-3)
    for options in ({"euler_at_final": True}, {}):  # 20 steps: lower_order_final does not apply
        final = load_scheduler("dpmpp_2m_sde", {**SD15, **SIGMA_MIN, **options}).schedule(20)
        assert (final.coeffs[-1, 0, 3] == 0) == bool(options) and final.needs_noise[-1]
    karras = load_scheduler("dpmpp_2m_sde_karras", SD15).schedule(10)
    np.testing.assert_array_equal(
        karras.timesteps, load_scheduler("dpmpp_2m_karras", SD15).schedule(10).timesteps
    )


def test_unipc_variants_cover_their_options() -> None:
    """UniPC's columns: 3 = h_1 (the previous call's corrected input sample), 4.. = h_2.. (its x0 outputs)."""
    default = load_scheduler("unipc", SD15).schedule(10)
    assert default.history_size == 3 and (default.coeffs[0, 0, 3:] == 0).all()
    assert (default.coeffs[1:-1, 0, 3] != 0).all()  # UniC but on the first call (the last returns x0)
    skipped = load_scheduler("unipc", {**SD15, "disable_corrector": [0, 1, 5]}).schedule(10)
    assert (skipped.coeffs[[1, 2, 6], 0, 3] == 0).all() and (skipped.coeffs[[3, 4, 5, 7], 0, 3] != 0).all()
    part = load_scheduler("unipc", {**SD15, "disable_corrector": [5, 6]}).schedule(10, strength=0.5)
    assert part.t_start == 5 and (part.coeffs[:3, 0, 3] == 0).all() and part.coeffs[3, 0, 3] != 0
    order3 = load_scheduler("unipc", {**SD15, "solver_order": 3}).schedule(12)
    assert order3.history_size == 4 and (order3.coeffs[:3, 0, 6] == 0).all() and order3.coeffs[3, 0, 6] != 0
    assert load_scheduler("unipc", {**SD15, "solver_order": 1}).schedule(10).history_size == 2
    bh1 = load_scheduler("unipc", {**SD15, "solver_type": "bh1", **SIGMA_MIN}).schedule(10)
    bh2 = load_scheduler("unipc", {**SD15, **SIGMA_MIN}).schedule(10)
    assert not np.allclose(bh1.coeffs, bh2.coeffs, rtol=1e-3)
    eps = load_scheduler("unipc", {**SD15, "predict_x0": False, **SIGMA_MIN}).schedule(10)
    assert not np.allclose(eps.coeffs, bh2.coeffs, rtol=1e-3)
    karras = load_scheduler("unipc", {**SD15, "use_karras_sigmas": True}).schedule(10)
    assert not np.array_equal(karras.timesteps, default.timesteps)
    converted = {**SD15, "_class_name": "DPMSolverMultistepScheduler", "solver_type": "midpoint"}
    assert load_scheduler("unipc", converted).params["solver_type"] == "bh2"


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"solver_type": "bh1"}, "bh1"),
        ({"predict_x0": False}, "predict_x0"),
        ({"lower_order_final": False}, ""),
    ],
)
def test_unipc_refuses_what_diffusers_cannot_finish(options: dict[str, Any], option: str) -> None:
    """A final sigma of 0 (lambda = inf) makes diffusers' last UniPC step 0 * inf with these options: refused
    (naming the option), and run with final_sigmas_type="sigma_min"."""
    config = {**SD15, **options}
    name = option or next(iter(options))
    with pytest.raises(UnsupportedConfigError, match=f"{name}.*final_sigmas_type='sigma_min'") as info:
        load_scheduler("unipc", config).schedule(10)
    assert "\n" not in str(info.value)
    with np.errstate(all="ignore"):
        assert not torch.isfinite(diffusers_trajectory("unipc", config, 10)).all()
    run_both("unipc", {**config, **SIGMA_MIN}, 10)
    if "lower_order_final" in options:  # only a second-order last step is not finite: one call is fine
        run_both("unipc", config, 1)
        run_both("unipc", config, 10, strength=0.1)


def test_harness_detects_a_missing_corrector() -> None:
    """UniPC's corrector and order are checked: the table without UniC fails at the first corrected call,
    a UniPC-2 table for a UniPC-3 run at the first third-order call."""
    no_corrector = load_scheduler("unipc", {**SD15, "disable_corrector": list(range(10))}).schedule(10)
    with pytest.raises(AssertionError, match="sample after call 1"):
        run_both("unipc", SD15, 10, schedule=no_corrector)
    order2 = load_scheduler("unipc", SD15).schedule(12)
    with pytest.raises(AssertionError, match="sample after call 2"):
        run_both("unipc", {**SD15, "solver_order": 3}, 12, schedule=order2)


def test_harness_detects_a_wrong_coefficient() -> None:
    """The comparison is sharp: one coefficient off by 1e-3 (relative) in one step fails it."""
    plan = load_scheduler("dpmpp_2m", SD15).schedule(10)
    run_both("dpmpp_2m", SD15, 10, schedule=plan)
    coeffs = plan.coeffs.copy()
    coeffs[5, 0, 3] *= np.float32(1 + 1e-3)  # DPM++ 2M's weight on the previous x0, step 5
    broken = dataclasses.replace(plan, coeffs=coeffs)
    with pytest.raises(AssertionError, match="sample after call 5"):
        run_both("dpmpp_2m", SD15, 10, schedule=broken)


def test_harness_replays_diffusers_sde_noise() -> None:
    """DPM-Solver's SDE noise is checked: its weight off by 1e-3 at one step fails that step, the ODE table
    fails the first call; and the harness's replay is diffusers' own: noise drawn in the reference dtype
    (float64 here) instead of diffusers' float32 fails, and a harness that thinks diffusers draws none
    refuses a table that reads noise."""
    plan = load_scheduler("dpmpp_2m_sde", SD15).schedule(10)
    run_both("dpmpp_2m_sde", SD15, 10, schedule=plan)
    coeffs = plan.coeffs.copy()
    coeffs[5, 0, 2] *= np.float32(1 + 1e-3)
    with pytest.raises(AssertionError, match="sample after call 5"):
        run_both("dpmpp_2m_sde", SD15, 10, schedule=dataclasses.replace(plan, coeffs=coeffs))
    ode = load_scheduler("dpmpp_2m", SD15).schedule(10)
    with pytest.raises(AssertionError, match="sample after call 0"):
        run_both("dpmpp_2m_sde", SD15, 10, schedule=ode)
    module = sys.modules[__name__]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "diffusers_noise_dtype", lambda name, dtype: dtype)
        with pytest.raises(AssertionError, match="sample after call 0"):
            run_both("dpmpp_2m_sde", SDXL_ZSNR, 4)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "DRAWS_EVERY_CALL", {"euler_a"})
        with pytest.raises(AssertionError, match="needs noise diffusers does not draw"):
            run_both("dpmpp_2m_sde", SD15, 4)


# --- image-to-image (strength) ---

IMG2IMG_CASES = [
    pytest.param(name, base, strength, steps, id=f"{name}-{base}-{strength}-{steps}")
    for base in ("sd15", "sd21")  # leading + steps_offset 1 + epsilon; linspace + v_prediction
    for name in SCHEDULER_NAMES
    for strength in (0.3, 0.55, 0.75, 1.0)
    for steps in (4, 10, 25)
]


@pytest.mark.parametrize(("name", "base", "strength", "steps"), IMG2IMG_CASES)
def test_img2img_matches_diffusers(name: str, base: str, strength: float, steps: int) -> None:
    run_both(name, BASE_CONFIGS[base], steps, strength=strength)


IMG2IMG_VARIANTS = [
    # (name, config, steps, strength)
    ("pndm", {**SD15, "timestep_spacing": "trailing"}, 6, 0.85),  # t_start 1: first two calls at t_1
    ("pndm", {**SD15, "timestep_spacing": "linspace", "set_alpha_to_one": True}, 9, 0.4),
    ("dpmpp_2m", {**SD15, "final_sigmas_type": "sigma_min"}, 20, 0.5),  # 10 calls, still 2nd-order final
    ("dpmpp_2m", {**SD15, "final_sigmas_type": "sigma_min"}, 10, 0.5),  # lower_order_final (< 15 steps)
    ("dpmpp_2m", {**SD15, "solver_type": "heun", "final_sigmas_type": "sigma_min"}, 16, 0.7),
    ("dpmpp_2m_karras", {**SDXL, "sigma_min": 0.1, "sigma_max": 10.0}, 12, 0.6),
    # Text-to-image fails in diffusers here (DIFFUSERS_INDEX_ERROR); img2img sets begin_index and runs.
    ("dpmpp_2m_karras", SDXL_ZSNR, 25, 1.0),
    ("dpmpp_2m_sde_karras", SDXL_ZSNR, 25, 1.0),
    ("dpmpp_2m_sde", {**SD15, **SIGMA_MIN}, 20, 0.5),  # 10 calls, second-order final step
    ("dpmpp_2m_sde", {**SD15, **SIGMA_MIN}, 10, 0.5),  # lower_order_final (< 15 steps)
    ("dpmpp_2m_sde", {**SD15, "solver_type": "heun", **SIGMA_MIN}, 16, 0.7),
    ("dpmpp_2m_sde_karras", {**SDXL, "sigma_min": 0.1, "sigma_max": 10.0}, 12, 0.6),
    ("euler", {**SDXL, "use_karras_sigmas": True}, 10, 0.45),
    ("euler", {**SD21, "timestep_type": "continuous"}, 10, 0.6),
    ("euler_a", SDXL, 10, 0.65),
    ("ddim", SDXL, 10, 0.65),
    ("lcm", {**SD15, "original_inference_steps": 20}, 7, 0.5),
    ("unipc", {**SD15, "solver_order": 3, "solver_type": "bh1", **SIGMA_MIN}, 12, 0.6),
    ("unipc", {**SD15, "disable_corrector": [5, 6]}, 10, 0.5),  # indices of the full schedule
    ("unipc", {**SDXL, "use_karras_sigmas": True}, 10, 0.45),
    ("unipc", SDXL_ZSNR, 25, 0.8),
]


@pytest.mark.parametrize(
    ("name", "config", "steps", "strength"),
    IMG2IMG_VARIANTS,
    ids=[f"{v[0]}-{i}" for i, v in enumerate(IMG2IMG_VARIANTS)],
)
def test_img2img_variants_match_diffusers(
    name: str, config: dict[str, Any], steps: int, strength: float
) -> None:
    run_both(name, config, steps, strength=strength)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("base", ["sd15", "sd21"])
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_inpaint_blend_matches_diffusers(name: str, base: str, strength: float) -> None:
    """Inpainting with a plain UNet: every step's re-noised image (``noise_scales``) as diffusers'."""
    run_both(name, BASE_CONFIGS[base], 10, strength=strength, inpaint=True)


def test_inpaint_blend_catches_the_wrong_timestep() -> None:
    """The harness catches noising the image to the step's own timestep instead of the next one."""
    plan = load_scheduler("euler", SD15).schedule(10)
    shifted = dataclasses.replace(plan, noise_scales=np.roll(plan.noise_scales, 1, axis=0))
    with pytest.raises(AssertionError, match="sample after call 0"):
        run_both("euler", SD15, 10, schedule=shifted, strength=1.0, inpaint=True)


STATEFUL = {
    name for name in SCHEDULER_NAMES if family(name) in ("pndm", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lms")
}


@pytest.mark.parametrize("name", sorted(name for name in STATEFUL if family(name) != "lms"))
def test_img2img_naive_slice_is_caught(name: str) -> None:
    """The harness catches the tempting shortcut: the last rows of the full table (history not restarted).
    (Not for LMS: diffusers weighs a restarted run's derivatives as the full run weighs them, and those it
    has not made yet are zero buffers, so there the shortcut gives the same trajectory.)"""
    full = load_scheduler(name, SD15).schedule(10)
    plan = load_scheduler(name, SD15).schedule(10, strength=0.65)
    naive = dataclasses.replace(plan, coeffs=full.coeffs[-len(plan.timesteps) :])
    with pytest.raises(AssertionError, match="sample after call 0"):
        run_both(name, SD15, 10, schedule=naive, strength=0.65)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_img2img_schedule_structure(name: str) -> None:
    """Strength 1 is the text-to-image schedule; a smaller one keeps the last rows of a stateless scheduler,
    while a multistep one restarts its history (its first kept row reads no history)."""
    scheduler = load_scheduler(name, SD15)
    full = scheduler.schedule(10)
    assert full.t_start == 0
    same = scheduler.schedule(10, strength=1.0)
    for field in ("timesteps", "input_scale", "coeffs", "needs_noise"):
        np.testing.assert_array_equal(getattr(same, field), getattr(full, field))
    assert same.image_noise == full.image_noise
    part = scheduler.schedule(10, strength=0.65)
    assert part.t_start == 4 and part.num_inference_steps == 10
    calls = 4 * (2 if family(name) in ("heun", "dpm2") else 1)  # t_start * order calls skipped
    np.testing.assert_array_equal(part.timesteps, full.timesteps[calls:])
    np.testing.assert_array_equal(part.input_scale, full.input_scale[calls:])
    if name in STATEFUL:
        assert (part.coeffs[0, 0, 3:] == 0).all()  # no history read on the first call
        assert not np.array_equal(part.coeffs, full.coeffs[calls:])
    else:  # Heun's history lasts one step: a run from a step boundary is the full one's tail
        np.testing.assert_array_equal(part.coeffs, full.coeffs[calls:])
    np.testing.assert_array_equal(part.needs_noise, full.needs_noise[calls:])
    # Less strength, less noise: the image weight grows, the noise weight shrinks.
    a1, b1 = full.image_noise
    a2, b2 = part.image_noise
    assert b2 < b1 and a2 >= a1 > 0


def test_img2img_image_noise_values() -> None:
    """image_noise in float64 from the stored float32 tables, per parametrisation."""
    abar = load_scheduler("ddim", SD15).alphas_cumprod()
    for name in ("ddim", "pndm", "lcm"):
        plan = load_scheduler(name, SD15).schedule(10, strength=0.5)
        t = int(plan.timesteps[0])
        assert plan.image_noise == (math.sqrt(abar[t]), math.sqrt(1 - abar[t]))
    euler = load_scheduler("euler", SD15).schedule(10, strength=0.5)
    sigma = float(np.sqrt(euler.input_scale[0].astype(np.float64) ** -2 - 1))
    assert euler.image_noise[0] == 1.0 and euler.image_noise[1] == pytest.approx(sigma, rel=1e-6)
    dpm = load_scheduler("dpmpp_2m", SD15).schedule(10, strength=0.5)
    a, b = dpm.image_noise
    assert a**2 + b**2 == pytest.approx(1.0, rel=1e-12)
    # PNDM's timestep list repeats t_1, so its sliced run starts one step noisier than DDIM's.
    ddim = load_scheduler("ddim", SD15).schedule(10, strength=0.5)
    pndm = load_scheduler("pndm", SD15).schedule(10, strength=0.5)
    assert pndm.timesteps[0] == ddim.timesteps[0] + 100 and len(pndm.timesteps) == len(ddim.timesteps) + 1


@pytest.mark.parametrize("strength", [0, 0.0, -0.5, 1.0001, 2, math.nan, math.inf, True, False, "0.5", None])
def test_bad_strength(strength: Any) -> None:
    for name in SCHEDULER_NAMES:
        with pytest.raises(InvalidArgumentError, match="strength") as info:
            load_scheduler(name, SD15).schedule(10, strength=strength)
        assert "\n" not in str(info.value)


def test_strength_too_small_for_a_step() -> None:
    for name in SCHEDULER_NAMES:
        scheduler = load_scheduler(name, SD15)
        for steps, strength in ((4, 0.2), (10, 0.09), (1, 0.999)):
            with pytest.raises(
                InvalidArgumentError, match="no denoising step.*raise strength or steps"
            ) as info:
                scheduler.schedule(steps, strength=strength)
            assert "\n" not in str(info.value)
        assert len(scheduler.schedule(10, strength=0.1).timesteps) == (2 if name == "pndm" else 1)
        assert scheduler.schedule(4, strength=np.float32(0.5)).t_start == 2  # numpy scalars are numbers
        assert scheduler.schedule(4, strength=1).t_start == 0


def test_strength_skipping_every_clipped_timestep() -> None:
    """lambda_min_clipped with trailing spacing gives DPM-Solver fewer than n timesteps (diffusers too)."""
    config = {**SD15, "lambda_min_clipped": -2.0, "timestep_spacing": "trailing"}
    scheduler = load_scheduler("dpmpp_2m", config)
    assert len(scheduler.schedule(10).timesteps) == 9
    with pytest.raises(InvalidArgumentError, match="skips all 9 timesteps"):
        scheduler.schedule(10, strength=0.15)
    run_both("dpmpp_2m", config, 10, strength=0.25)


# --- tables ---


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_defaults_are_diffusers_defaults(name: str) -> None:
    from sdengine.schedulers import _CLASSES

    class_name, _ = DIFFUSERS_EQUIVALENT[name]
    assert diffusers_scheduler_class(name) == DIFFUSERS_EQUIVALENT[name]
    signature = inspect.signature(getattr(diffusers, class_name).__init__)
    expected = {k: p.default for k, p in signature.parameters.items() if k != "self"}
    assert _CLASSES[name].defaults == expected


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(schedule: str) -> None:
    ref = diffusers.DDIMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012)
    betas = tables.betas(1000, 0.00085, 0.012, schedule)
    np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=3e-7, atol=0)
    np.testing.assert_allclose(tables.alphas_cumprod(betas), ref.alphas_cumprod.numpy(), rtol=2e-6, atol=0)


def test_zero_snr_rescale_is_diffusers_formula_in_float64() -> None:
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = tables.betas(1000, 0.00085, 0.012, "scaled_linear")
    exact = rescale_zero_terminal_snr(torch.from_numpy(betas)).numpy()  # float64 tensor in, float64 out
    np.testing.assert_allclose(tables.rescale_zero_terminal_snr(betas), exact, rtol=1e-12, atol=1e-15)
    ours = tables.alphas_cumprod(
        tables.betas(1000, 0.00085, 0.012, "scaled_linear", rescale_betas_zero_snr=True)
    )
    ref = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
    ).alphas_cumprod.numpy()
    assert ours[-1] == ref[-1] == 0.0
    np.testing.assert_allclose(ours, ref, rtol=5e-5, atol=0)


@pytest.mark.parametrize("spacing", tables.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("steps", [1, 3, 50, 61, 103, 999, 1000])
def test_spaced_timesteps_match_ddim(spacing: str, steps: int) -> None:
    offset = 1 if steps < 1000 else 0
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    ours = np.round(tables.spaced_timesteps(spacing, 1000, steps, offset)).astype(np.int64)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())
    if ours.min() < 0:  # trailing, 61 steps: float arange adds a 62nd timestep, -1, which diffusers feeds on
        with pytest.raises(InvalidArgumentError, match="outside"):
            tables.integer_timesteps(ours, 1000)


def test_karras_sigmas_formula() -> None:
    sigmas = tables.karras_sigmas(0.03, 14.6, 5)
    ramp = np.linspace(0, 1, 5)
    expected = [(14.6 ** (1 / 7) + r * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7 for r in ramp]
    np.testing.assert_allclose(sigmas, expected, rtol=1e-14)
    assert sigmas[0] == pytest.approx(14.6) and sigmas[-1] == pytest.approx(0.03)


# --- step ---


def _inputs(k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(3 + k)]
    return arrays[0], arrays[1], arrays[2], tuple(arrays[3:])


def test_step_is_the_matrix_product() -> None:
    rng = np.random.default_rng(1)
    coeffs = rng.standard_normal((3, 5)).astype(np.float32)
    coeffs[1] = [0, 0, 0, 1, 0]  # a pure copy of h_1
    coeffs[2] = 0  # a cleared buffer
    sample, output, noise, history = _inputs(2)
    before = [a.copy() for a in (sample, output, noise, *history)]
    new_sample, new_history = step(coeffs, sample, output, noise, history)
    stacked = np.stack([sample, output, noise, *history]).astype(np.float64)
    expected = np.tensordot(coeffs.astype(np.float64), stacked, axes=1)
    np.testing.assert_allclose(new_sample, expected[0], rtol=1e-6, atol=1e-6)
    assert new_history[0] is history[0]  # copies alias their input
    np.testing.assert_array_equal(new_history[1], np.zeros(SHAPE, np.float32))
    for a, b in zip(before, (sample, output, noise, *history), strict=True):
        np.testing.assert_array_equal(a, b)  # pure: inputs untouched


def test_step_skips_zero_columns_and_checks_inputs() -> None:
    plan = load_scheduler("pndm", SD15).schedule(10)
    sample, output, _, _ = _inputs(0)
    history = initial_history(plan, SHAPE)
    assert len(history) == 4 and not any(h.any() for h in history)
    new_sample, new_history = step(plan.coeffs[0], sample, output, None, history)  # noise column is zero
    assert new_history[0] is sample and new_history[1] is output  # stored sample and eps, not copies
    with pytest.raises(InvalidArgumentError, match="history"):
        step(plan.coeffs[0], sample, output, None, history[:2])
    lcm = load_scheduler("lcm", SD15).schedule(4)
    with pytest.raises(InvalidArgumentError, match="noise"):
        step(lcm.coeffs[0], sample, output, None, ())
    with pytest.raises(InvalidArgumentError, match="shape"):
        step(lcm.coeffs[0], sample, output[:1], sample, ())
    with pytest.raises(InvalidArgumentError, match="coeffs"):
        step(lcm.coeffs, sample, output, sample, ())


# --- config ---


@pytest.mark.parametrize("config", [*BASE_CONFIGS.values(), *(v[1] for v in VARIANTS)])
def test_config_round_trip(config: dict[str, Any]) -> None:
    parsed = SchedulerConfig.from_dict(config)
    assert parsed.to_dict() == config
    assert SchedulerConfig.from_dict(parsed.to_dict()) == parsed
    assert SchedulerConfig.from_dict(json.loads(json.dumps(parsed.to_dict()))) == parsed
    assert hash(parsed) == hash(SchedulerConfig.from_dict(dict(config)))


def test_config_typed_fields() -> None:
    parsed = SchedulerConfig.from_dict({**SD15, "my_key": [1, 2], "beta_start": 1})
    assert parsed.class_name == "PNDMScheduler" and parsed.steps_offset == 1
    assert parsed.beta_start == 1.0 and isinstance(parsed.beta_start, float)
    assert parsed.trained_betas is None and "trained_betas" in parsed.null_keys
    assert parsed.extra["my_key"] == [1, 2] and parsed.extra["_diffusers_version"] == "0.6.0"
    assert parsed.get("timestep_spacing", "x") == "x" and not parsed.has("timestep_spacing")
    assert parsed.with_values(timestep_spacing="trailing").timestep_spacing == "trailing"
    with pytest.raises(UnsupportedConfigError, match="steps_offset"):
        SchedulerConfig.from_dict({**SD15, "steps_offset": "1"})
    with pytest.raises(UnsupportedConfigError, match="set_alpha_to_one"):
        SchedulerConfig.from_dict({**SD15, "set_alpha_to_one": 0})


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (SD15, "pndm"),
        (SD21, "ddim"),
        (SDXL, "euler"),
        ({**SD15, "_class_name": "EulerAncestralDiscreteScheduler"}, "euler_a"),
        ({**SD15, "_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m"),
        (
            {**SD15, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True},
            "dpmpp_2m_karras",
        ),
        ({**SD15, "_class_name": "LCMScheduler"}, "lcm"),
        ({**SD15, "_class_name": "UniPCMultistepScheduler"}, "unipc"),
        (
            {**SD15, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"},
            "dpmpp_2m_sde",
        ),
        (
            {**SD15, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}
            | {"use_karras_sigmas": True},
            "dpmpp_2m_sde_karras",
        ),
        # diffusers drops the keys its writer marked as defaults: the class default algorithm again
        (
            {**SD15, "_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}
            | {"_use_default_values": ["algorithm_type"]},
            "dpmpp_2m",
        ),
    ],
)
def test_checkpoint_scheduler_by_class(config: dict[str, Any], expected: str) -> None:
    scheduler = load_scheduler(None, config)
    assert scheduler.name == expected
    assert scheduler.config == load_scheduler(expected, config).config
    ref = getattr(diffusers, config["_class_name"]).from_config(config)  # the checkpoint's own scheduler
    if isinstance(ref, diffusers.DPMSolverMultistepScheduler):
        assert ref.config.algorithm_type == ("sde-dpmsolver++" if "_sde" in expected else "dpmsolver++")
        assert ref.config.use_karras_sigmas == expected.endswith("_karras")


# --- refusals ---


def test_unknown_names() -> None:
    with pytest.raises(UnknownSchedulerError) as info:
        load_scheduler("dpmpp_sde", SD15)
    assert all(name in str(info.value) for name in SCHEDULER_NAMES)
    for config in ({**SD15, "_class_name": "DEISMultistepScheduler"}, {"beta_start": 0.001}):
        with pytest.raises(UnknownSchedulerError, match="dpmpp_2m_karras"):
            load_scheduler(None, config)
    with pytest.raises(UnknownSchedulerError):
        diffusers_scheduler_class("ddpm")


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [0, -3, 1001, 2.0, True])
def test_bad_step_counts(name: str, steps: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="steps"):
        load_scheduler(name, SD15).schedule(steps)


def test_step_count_limits() -> None:
    with pytest.raises(InvalidArgumentError, match="original_inference_steps"):
        load_scheduler("lcm", SD15).schedule(51)
    with pytest.raises(InvalidArgumentError, match="outside"):
        load_scheduler("ddim", SD15).schedule(1000)  # leading + steps_offset 1 reaches timestep 1000
    for name in ("ddim", "pndm", "euler", "dpmpp_2m"):  # trailing, 61 steps reaches timestep -1
        with pytest.raises(InvalidArgumentError, match="outside"):
            load_scheduler(name, {**SD15, "timestep_spacing": "trailing"}).schedule(61)
    assert len(load_scheduler("ddim", {**SD15, "steps_offset": 0}).schedule(1000).timesteps) == 1000


@pytest.mark.parametrize(
    ("name", "options", "option"),
    [
        ("ddim", {"clip_sample": True}, "clip_sample"),
        ("ddim", {"thresholding": True}, "thresholding"),
        ("ddim", {"prediction_type": "sample"}, "prediction_type"),
        ("ddim", {"timestep_spacing": "karras"}, "timestep_spacing"),
        ("ddim", {"beta_schedule": "sigmoid"}, "beta_schedule"),
        ("ddim", {"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ("pndm", {"skip_prk_steps": False}, "skip_prk_steps"),
        ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
        ("euler", {"use_exponential_sigmas": True, "use_karras_sigmas": True}, "one sigma spacing at a time"),
        ("euler", {"use_beta_sigmas": True, "use_exponential_sigmas": True}, "one sigma spacing at a time"),
        ("euler_a", {"prediction_type": "sample"}, "prediction_type"),
        ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ("dpmpp_2m", {"algorithm_type": "dpmsolver"}, "algorithm_type"),
        ("dpmpp_2m", {"solver_order": 3}, "solver_order"),
        ("dpmpp_2m", {"thresholding": True}, "thresholding"),
        ("dpmpp_2m", {"use_lu_lambdas": True}, "use_lu_lambdas"),
        ("dpmpp_2m", {"use_flow_sigmas": True}, "use_flow_sigmas"),
        ("dpmpp_2m", {"variance_type": "learned_range"}, "variance_type"),
        ("dpmpp_2m", {"algorithm_type": "deis"}, "final_sigmas_type"),
        ("dpmpp_2m_beta", {"use_lu_lambdas": True}, "use_lu_lambdas"),
        ("dpmpp_2m_sde", {"solver_order": 3}, "solver_order"),
        ("dpmpp_2m_sde", {"solver_order": 1}, "solver_order"),
        ("dpmpp_2m_sde", {"thresholding": True}, "thresholding"),
        ("dpmpp_2m_sde", {"variance_type": "learned_range"}, "variance_type"),
        ("dpmpp_2m_sde", {"final_sigmas_type": "sigma_max"}, "final_sigmas_type"),
        ("dpmpp_2m_sde", {"use_lu_lambdas": True}, "use_lu_lambdas"),
        ("dpmpp_2m_sde_karras", {"use_flow_sigmas": True}, "use_flow_sigmas"),
        ("lcm", {"clip_sample": True}, "clip_sample"),
        ("lcm", {"thresholding": True}, "thresholding"),
        ("euler", {"steps_offset": None}, "steps_offset"),
        ("unipc", {"solver_order": 4}, "solver_order"),
        ("unipc", {"solver_type": "bh3"}, "solver_type"),
        ("unipc", {"thresholding": True}, "thresholding"),
        ("unipc", {"solver_p": "DDIMScheduler"}, "solver_p"),
        ("unipc", {"use_exponential_sigmas": True, "use_karras_sigmas": True}, "one sigma spacing at a time"),
        ("unipc", {"use_beta_sigmas": True, "use_karras_sigmas": True}, "one sigma spacing at a time"),
        ("unipc", {"use_flow_sigmas": True}, "use_flow_sigmas"),
        ("unipc", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ("unipc", {"shift_terminal": 0.1}, "shift_terminal"),
        ("unipc", {"final_sigmas_type": "sigma_max"}, "final_sigmas_type"),
        ("unipc", {"prediction_type": "flow_prediction"}, "prediction_type"),
        ("unipc", {"disable_corrector": None}, "disable_corrector"),
        ("unipc", {"disable_corrector": [1.0]}, "disable_corrector"),
    ],
)
def test_unsupported_options(name: str, options: dict[str, Any], option: str) -> None:
    with pytest.raises(UnsupportedConfigError, match=option) as info:
        load_scheduler(name, {**SD15, **options}).schedule(10)
    assert "\n" not in str(info.value)


def test_default_clip_sample_is_refused_for_ddim() -> None:
    """DDIM's class default is clip_sample=True: a config without the key is refused, not silently changed."""
    config = {k: v for k, v in SDXL.items() if k != "clip_sample"}
    with pytest.raises(UnsupportedConfigError, match="clip_sample"):
        load_scheduler("ddim", config)
    load_scheduler("euler", config)  # Euler has no such option


def test_runtime_does_not_import_torch() -> None:
    code = (
        "import sys, sdengine.schedulers as s\n"
        f"plan = s.load_scheduler('dpmpp_2m_karras', {SD15!r}).schedule(4)\n"
        "x, h = s.step(plan.coeffs[0], plan.timesteps, plan.timesteps, None, (plan.timesteps,))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(("a", "b"), [(0.6, 0.6), (0.5, 2.0), (3.0, 0.7), (1.0, 1.0)])
def test_beta_quantiles_are_scipys(a: float, b: float) -> None:
    """The beta sigmas' quantiles (the runtime has no scipy), against scipy's ``beta.ppf``."""
    from scipy import stats

    from sdengine.schedulers.tables import beta_ppf

    for q in np.linspace(0, 1, 41):
        assert beta_ppf(float(q), a, b) == pytest.approx(stats.beta.ppf(q, a, b), abs=1e-13), q


# --- custom timesteps and sigmas (diffusers' set_timesteps(timesteps=...) and (sigmas=...)) ---

#: Each scheduler that takes a custom schedule, with the kinds it takes: timesteps where diffusers' class
#: does, sigmas where it does (Euler) or where they can take the place of its Karras sigmas.
CUSTOM_TAKERS = {
    "euler": KINDS,
    "heun": KINDS,
    "dpmpp_2m": KINDS,
    "dpmpp_2m_sde": KINDS,
    "euler_a": ("sigmas",),
    "dpm2": ("sigmas",),
    "lms": ("sigmas",),
    "unipc": ("sigmas",),
}
#: Hand-made schedules besides the presets: uneven gaps, a single step.
HAND_MADE = {
    "timesteps": [(900, 700, 500, 320, 150, 60, 5), (500,)],
    "sigmas": [(10.0, 3.0, 1.0, 0.3, 0.05, 0.0), (6.0, 0.0)],
}
CUSTOM_CASES = [
    pytest.param(name, base, prediction, kind, values, id=f"{name}-{base}-{prediction}-{kind}-{len(values)}")
    for name, kinds in CUSTOM_TAKERS.items()
    for kind in kinds
    for base in BASE_CONFIGS
    for prediction in ("epsilon", "v_prediction")
    for values in [PRESETS["ays"][kind]["xl" if base.startswith("sdxl") else "sd"], *HAND_MADE[kind]]
]


@pytest.mark.parametrize(("name", "base", "prediction", "kind", "values"), CUSTOM_CASES)
def test_custom_steps_match_diffusers(
    name: str, base: str, prediction: str, kind: str, values: tuple[float, ...]
) -> None:
    custom = CustomSteps(kind, values)
    config = {**BASE_CONFIGS[base], "prediction_type": prediction}
    run_both(name, config, custom.steps, custom=custom)


@pytest.mark.parametrize(
    ("name", "config", "kind", "strength"),
    [
        ("euler", SD15, "timesteps", 0.6),
        ("euler", SDXL, "sigmas", 0.5),
        ("euler_a", SD15, "sigmas", 0.6),
        ("dpm2", SD21, "sigmas", 0.7),
        ("lms", SDXL, "sigmas", 1.0),
        ("unipc", {**SD15, "solver_order": 3}, "sigmas", 0.6),
        ("dpmpp_2m_karras", SD15, "sigmas", 1.0),  # the custom sigmas take the Karras ones' place
        ("dpmpp_2m_sde", {**SD15, "use_beta_sigmas": True}, "sigmas", 0.5),
        ("euler", {**SD21, "timestep_type": "continuous"}, "sigmas", 0.7),  # c_noise from the sigmas
        ("euler", {**SDXL, "use_karras_sigmas": True}, "sigmas", 1.0),  # diffusers reads the sigmas as given
        ("euler", {**SD15, "final_sigmas_type": "sigma_min"}, "timesteps", 1.0),
        ("heun", SD21, "timesteps", 0.55),
        ("dpmpp_2m", {**SD15, "final_sigmas_type": "sigma_min"}, "timesteps", 0.8),
        ("dpmpp_2m", {**SD15, "solver_type": "heun", "lower_order_final": False}, "timesteps", 1.0),
        ("dpmpp_2m_sde", SDXL_ZSNR, "timesteps", 0.6),
        ("dpmpp_2m_sde", {**SD15, "final_sigmas_type": "sigma_min"}, "timesteps", 1.0),
    ],
)
def test_custom_steps_variants_match_diffusers(
    name: str, config: dict[str, Any], kind: str, strength: float
) -> None:
    custom = CustomSteps(kind, PRESETS["ays"][kind]["sd"])
    run_both(name, config, custom.steps, strength=None if strength == 1.0 else strength, custom=custom)


def test_euler_sigmas_end_anywhere() -> None:
    """diffusers' Euler takes sigmas whose last, where the run stops, is not 0 (the others end at 0)."""
    for base in ("sd15", "sdxl_zsnr"):
        custom = CustomSteps("sigmas", (10.0, 3.0, 1.0, 0.3, 0.05))
        run_both("euler", BASE_CONFIGS[base], custom.steps, custom=custom)


def test_custom_sigmas_end_at_the_final_sigma_type() -> None:
    custom = CustomSteps("sigmas", PRESETS["ays"]["sigmas"]["sd"])
    for name in ("dpmpp_2m", "unipc"):
        with pytest.raises(UnsupportedConfigError, match="final_sigmas_type='sigma_min'"):
            load_scheduler(name, {**SD15, "final_sigmas_type": "sigma_min"}, custom)


@pytest.mark.parametrize("kind", KINDS)
def test_the_refusals_name_the_schedulers_that_take_them(kind: str) -> None:
    takers = {family(name) for name in SCHEDULER_NAMES if kind in load_scheduler(name, SD15).takes_custom}
    assert takers == {name for name, kinds in CUSTOM_TAKERS.items() if kind in kinds}
    assert set(TAKERS_NAMED[kind].split(", ")) == takers


def test_custom_steps_replace_the_spacing() -> None:
    """The harness sees a custom schedule that is not the one run: diffusers given other timesteps fails."""
    ours = CustomSteps("timesteps", (900, 700, 500, 320, 150, 60, 5))
    theirs = CustomSteps("timesteps", (900, 700, 500, 320, 150, 60, 4))
    plan = load_scheduler("dpmpp_2m", SD15, ours).schedule(7)
    with pytest.raises(AssertionError):
        run_both("dpmpp_2m", SD15, 7, schedule=plan, custom=theirs)
    assert load_scheduler("euler", SD15, ours).schedule(7).timesteps.tolist() == list(ours.values)
    default = load_scheduler("euler", SD15).schedule(7).timesteps
    assert not np.allclose(default, ours.values)


@pytest.mark.parametrize(
    ("name", "custom", "error", "match"),
    [
        ("euler_a", CustomSteps("timesteps", (999, 500)), UnsupportedConfigError, "euler_a takes no custom"),
        ("lms", CustomSteps("timesteps", (999, 500)), UnsupportedConfigError, "lms takes no custom"),
        ("ddim", CustomSteps("sigmas", (3.0, 0.0)), UnsupportedConfigError, "ddim takes no custom sigmas"),
        (
            "lcm",
            CustomSteps("timesteps", (999, 500)),
            UnsupportedConfigError,
            "lcm takes no custom timesteps",
        ),
        ("pndm", CustomSteps("sigmas", (3.0, 0.0)), UnsupportedConfigError, "pndm takes no custom sigmas"),
        ("dpmpp_2m", CustomSteps("sigmas", (3.0, 0.5)), InvalidArgumentError, "end at 0 .* got 0.5"),
        ("euler_a", CustomSteps("sigmas", (3.0, 0.5)), InvalidArgumentError, "only euler ends anywhere"),
        ("euler_karras", CustomSteps("timesteps", (999, 500)), UnsupportedConfigError, "karras sigmas"),
        ("dpmpp_2m_sde_beta", CustomSteps("timesteps", (999, 500)), UnsupportedConfigError, "beta sigmas"),
        ("euler", CustomSteps("timesteps", (1000, 500)), InvalidArgumentError, "<= 999"),
        ("dpmpp_2m", CustomSteps("timesteps", (999, 500.5)), InvalidArgumentError, "whole numbers"),
    ],
)
def test_custom_steps_refused(name: str, custom: CustomSteps, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        load_scheduler(name, SD15, custom)


@pytest.mark.parametrize(
    ("kind", "values", "match"),
    [
        ("timesteps", (), "at least 1"),
        ("sigmas", (3.0,), "at least 2"),
        ("timesteps", (500, 500, 100), "decrease strictly"),
        ("timesteps", (100, 500), "decrease strictly"),
        ("sigmas", (3.0, -0.1), ">= 0"),
        ("timesteps", (999, math.nan), "finite numbers"),
        ("timesteps", (999, "500"), "finite numbers"),
        ("timesteps", (True, 0), "finite numbers"),
        ("seconds", (3.0, 1.0), "timesteps or sigmas"),
    ],
)
def test_bad_custom_steps(kind: str, values: tuple[Any, ...], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        CustomSteps(kind, values)


def test_custom_steps_fix_the_step_count() -> None:
    scheduler = load_scheduler("euler", SD15, CustomSteps("sigmas", (3.0, 1.0, 0.0)))
    assert scheduler.schedule(2).num_inference_steps == 2
    with pytest.raises(InvalidArgumentError, match="the custom sigmas give 2 steps, not 3"):
        scheduler.schedule(3)


def test_custom_steps_from_names_and_lists() -> None:
    assert custom_steps() is None
    assert custom_steps("ays").values == tuple(map(float, PRESETS["ays"]["timesteps"]["sd"]))
    assert custom_steps(sigmas="ays", xl=True) == CustomSteps("sigmas", PRESETS["ays"]["sigmas"]["xl"])
    assert custom_steps([999, 500]).values == (999.0, 500.0)
    assert custom_steps(sigmas=np.array([2.0, 0.5, 0.0])).steps == 2
    with pytest.raises(InvalidArgumentError, match="not both"):
        custom_steps("ays", "ays")
    with pytest.raises(InvalidArgumentError, match="unknown sigmas preset 'karras'"):
        custom_steps(sigmas="karras")
    with pytest.raises(InvalidArgumentError, match="list of numbers"):
        custom_steps(timesteps=7)
    assert parse_custom("ays") == "ays"
    assert parse_custom(" 999, 500,10 ") == (999.0, 500.0, 10.0)
    with pytest.raises(InvalidArgumentError, match="a custom schedule takes a preset \\(ays\\) or numbers"):
        parse_custom("ays10")
