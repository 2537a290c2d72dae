"""The web UI's noise schedules that are lists of sigmas (sdengine/webui_schedules.py), against their
definitions over SD 1.5's training sigmas."""

from __future__ import annotations

import numpy as np
import pytest

from sdengine.schedulers import load_scheduler, tables
from sdengine.webui_schedules import (
    AYS_SIGMAS,
    ENDS_ABOVE_ZERO,
    SIGMA_SCHEDULES,
    loglinear_interp,
    schedule_sigmas,
    t_to_sigma,
)

SD15 = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
ABAR = load_scheduler("euler", SD15).alphas_cumprod()
TRAIN = tables.sigmas_from_alphas_cumprod(ABAR)


@pytest.mark.parametrize("label", SIGMA_SCHEDULES)
@pytest.mark.parametrize("n", [1, 2, 7, 10, 11, 30, 1000])
def test_every_schedule_gives_n_steps_down_to_0(label, n):
    sigmas = np.array(schedule_sigmas(label, n, ABAR, xl=False))
    assert np.all(np.diff(sigmas) < 0)
    if label == "DDIM":  # every (1000 // n)-th training sigma from timestep 1: as many as fit
        assert sigmas.shape == (len(range(1, 1000, max(1000 // n, 1))) + 1,) and sigmas[-1] == 0
        assert sigmas[-2] == pytest.approx(TRAIN[1], rel=1e-6)
        return
    assert sigmas.shape == (n + 1,)
    assert sigmas[-1] == (pytest.approx(TRAIN[0], rel=1e-6) if label in ENDS_ABOVE_ZERO else 0)
    if label == "Align Your Steps" and n == 1:  # the web UI's interpolation to one point: the last sigma
        assert sigmas[0] == pytest.approx(0.029)
        return
    assert sigmas[0] == pytest.approx(14.615 if label == "Align Your Steps" else TRAIN[-1], rel=1e-6)


def test_polyexponential_is_evenly_spaced_in_log_sigma_over_the_training_range():
    sigmas = np.array(schedule_sigmas("Polyexponential", 5, ABAR, False), np.float64)
    np.testing.assert_allclose(sigmas[:-1], np.geomspace(TRAIN[-1], TRAIN[0], 5), rtol=2e-6)
    assert sigmas[-1] == 0 and sigmas[0] == pytest.approx(TRAIN[-1], rel=1e-6)


def test_ddim_takes_every_strideth_training_sigma_from_timestep_1():
    twenty = schedule_sigmas("DDIM", 20, ABAR, False)  # timesteps 951, 901, ..., 1: diffusers' DDIM's
    np.testing.assert_array_equal(twenty, np.float32([*TRAIN[951:0:-50], 0]))
    assert len(schedule_sigmas("DDIM", 30, ABAR, False)) == 32  # stride 33 from 1: 31 steps, as in the web UI
    assert len(schedule_sigmas("DDIM", 3, ABAR, False)) == 4  # timesteps 667, 334, 1


def test_kl_optimal_is_evenly_spaced_in_arctan_sigma_and_ends_at_the_smallest():
    sigmas = np.array(schedule_sigmas("KL Optimal", 4, ABAR, False), np.float64)
    angles = np.arctan(sigmas)
    np.testing.assert_allclose(np.diff(angles), (np.arctan(TRAIN[0]) - np.arctan(TRAIN[-1])) / 4, rtol=1e-5)
    assert sigmas[0] == pytest.approx(TRAIN[-1], rel=1e-6) and sigmas[-1] == pytest.approx(TRAIN[0], rel=1e-6)


@pytest.mark.parametrize("xl", [False, True])
def test_align_your_steps_keeps_its_list_at_11_steps_and_interpolates_in_log_sigma(xl):
    base = AYS_SIGMAS["xl" if xl else "sd"]
    expected = tuple(float(np.float32(s)) for s in (*base, 0))
    assert schedule_sigmas("Align Your Steps", 11, ABAR, xl) == expected
    twenty = np.array(schedule_sigmas("Align Your Steps", 20, ABAR, xl)[:-1], np.float64)
    assert twenty[0] == pytest.approx(base[0]) and twenty[-1] == pytest.approx(base[-1])
    # every second of 21 evenly spaced points of the log-linear curve is one of the 11 given sigmas
    np.testing.assert_allclose(loglinear_interp(np.array(base), 21)[::2], base, rtol=1e-12)
    log_gaps = np.diff(np.log(twenty))
    assert np.all(log_gaps < 0)
    ten = schedule_sigmas("Align Your Steps", 10, ABAR, xl)
    assert ten != schedule_sigmas("Align Your Steps", 10, ABAR, not xl)


def test_t_to_sigma_interpolates_log_sigma_between_training_timesteps():
    np.testing.assert_allclose(t_to_sigma(np.arange(1000), TRAIN), TRAIN, rtol=1e-12)
    assert t_to_sigma(np.array(0.5), TRAIN) == pytest.approx(np.sqrt(TRAIN[0] * TRAIN[1]))
    t = np.array([3.25, 500.5, 998.9])
    np.testing.assert_allclose(tables.sigma_to_t(t_to_sigma(t, TRAIN), TRAIN), t, atol=1e-4)


def test_uniform_normal_and_simple_over_the_whole_training_range():
    every = np.append(TRAIN[::-1], 0.0).astype(np.float32)
    for label in ("Uniform", "Normal", "Simple"):  # 1000 steps: each training sigma once
        np.testing.assert_allclose(schedule_sigmas(label, 1000, ABAR, False), every, rtol=2e-6)
    simple = schedule_sigmas("Simple", 4, ABAR, False)  # every 250th from the top
    np.testing.assert_array_equal(simple, np.float32([TRAIN[999], TRAIN[749], TRAIN[499], TRAIN[249], 0]))
    normal = np.array(schedule_sigmas("Normal", 4, ABAR, False))  # timesteps 999, 666, 333, 0
    np.testing.assert_allclose(normal[:-1], TRAIN[[999, 666, 333, 0]], rtol=2e-6)


def test_sgm_uniform_stops_short_of_the_smallest_sigma():
    sgm = np.array(schedule_sigmas("SGM Uniform", 3, ABAR, False))  # timesteps 999, 666, 333 (of 4 points)
    np.testing.assert_allclose(sgm[:-1], TRAIN[[999, 666, 333]], rtol=2e-6)
    assert np.array(schedule_sigmas("Normal", 3, ABAR, False))[-2] == pytest.approx(TRAIN[0], rel=2e-6)
