"""The step model (run by every backend) against the numpy reference step and guidance, per scheduler."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from export.checkpoint import SD15_SCHEDULER_CONFIG
from sdengine.schedulers import SCHEDULER_NAMES, initial_history, load_scheduler, step
from sdengine.step_graph import MAX_HISTORY, STEP_OUTPUTS, build_step_model, first_unet_inputs, step_tables

SD15 = {"_class_name": "PNDMScheduler", **SD15_SCHEDULER_CONFIG}


def session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
@pytest.mark.parametrize("guidance", [None, 7.5])
def test_step_model_follows_the_reference_step(name, guidance):
    schedule = load_scheduler(name, SD15).schedule(6)
    batch, latent = 2, (4, 3, 5)
    copies = 1 if guidance is None else 2
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((len(schedule.timesteps), batch, *latent), dtype=np.float32)
    tables = step_tables(schedule, noise)
    model = build_step_model(
        batch=batch, latent_shape=latent, num_calls=tables.num_calls, guidance=guidance is not None
    )
    run = session(model)
    x = rng.standard_normal((batch, *latent), dtype=np.float32)
    ref_x, ref_history = x, initial_history(schedule, x.shape)
    state = {
        "sample": x,
        "history": np.zeros((MAX_HISTORY, batch, *latent), np.float32),
        "step_index": np.array(0, np.int64),
    }
    unet_input = first_unet_inputs(tables, x, copies)
    for i in range(tables.num_calls):
        expected_input = np.concatenate([ref_x * schedule.input_scale[i]] * copies)
        input_scale = max(1.0, float(np.abs(expected_input).max()))  # as the sample's check below
        np.testing.assert_allclose(unet_input, expected_input, rtol=1e-5, atol=1e-5 * input_scale)
        noise_pred = np.sin(unet_input * 3 + i).astype(np.float32)  # a stand-in UNet
        eps = noise_pred
        if guidance is not None:
            uncond, cond = np.split(noise_pred, 2)
            eps = uncond + np.float32(guidance) * (cond - uncond)
        ref_x, ref_history = step(
            schedule.coeffs[i], ref_x, eps, noise[i] if schedule.needs_noise[i] else None, ref_history
        )
        feed = {
            "noise_pred": noise_pred,
            **state,
            "coeffs": tables.coeffs,
            "timesteps": tables.timesteps,
            "input_scales": tables.input_scales,
            "noise": tables.noise,
            "guidance": np.array(guidance or 1.0, np.float32),
        }
        sample, history, index, unet_input, t = run.run(STEP_OUTPUTS, feed)
        scale = max(1.0, float(np.abs(ref_x).max()))
        np.testing.assert_allclose(sample, ref_x, rtol=1e-5, atol=1e-5 * scale)
        for j, h in enumerate(ref_history):
            np.testing.assert_allclose(history[j], h, rtol=1e-5, atol=1e-5 * scale)
        assert not history[len(ref_history) :].any()  # padding buffers stay zero
        assert int(index) == i + 1
        assert float(t) == tables.timesteps[i + 1]
        state = {"sample": sample, "history": history, "step_index": index}


def test_timestep_takes_the_shape_and_dtype_the_unet_declares():
    schedule = load_scheduler("ddim", SD15).schedule(3)
    tables = step_tables(schedule, np.zeros((3, 1, 4, 2, 2), np.float32))
    model = build_step_model(
        batch=1,
        latent_shape=(4, 2, 2),
        num_calls=3,
        guidance=True,
        timestep_shape=(2,),
        timestep_dtype=TensorProto.INT64,
    )
    feed = {
        "noise_pred": np.zeros((2, 4, 2, 2), np.float32),
        "sample": np.zeros((1, 4, 2, 2), np.float32),
        "history": np.zeros((MAX_HISTORY, 1, 4, 2, 2), np.float32),
        "step_index": np.array(0, np.int64),
        "coeffs": tables.coeffs,
        "timesteps": tables.timesteps,
        "input_scales": tables.input_scales,
        "noise": tables.noise,
        "guidance": np.array(7.5, np.float32),
    }
    t = session(model).run(["unet_timestep"], feed)[0]
    assert t.dtype == np.int64 and t.shape == (2,)
    assert (t == int(schedule.timesteps[1])).all()


def test_tables_pad_history_and_keep_a_spare_timestep():
    schedule = load_scheduler("dpmpp_2m", SD15).schedule(4)
    tables = step_tables(schedule, np.zeros((4, 1, 4, 2, 2), np.float32))
    assert tables.coeffs.shape == (4, 1 + MAX_HISTORY, 3 + MAX_HISTORY)
    k = schedule.history_size
    np.testing.assert_array_equal(tables.coeffs[:, : 1 + k, : 3 + k], schedule.coeffs)
    assert not tables.coeffs[:, 1 + k :].any() and not tables.coeffs[:, :, 3 + k :].any()
    assert tables.timesteps.shape == (5,) and tables.timesteps[-1] == schedule.timesteps[-1]
