"""Composable prompts (the web UI's ``AND`` and a part's ``:weight``, sdengine/composable.py): parsed as the
web UI parses them, summed in the step model as ``uncond + g * sum_k w_k (cond_k - uncond)``, and checked
end to end through identities that hold only if every part reaches the UNet with its own weight: a part
given twice pulls twice as hard, a part of weight 0 pulls nowhere, the order of parts does not matter."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from sdengine.composable import composable_parts, part_texts, part_weights, prompt_parts
from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.images import psnr
from sdengine.pipeline import Pipeline
from sdengine.request import make_request
from sdengine.step_graph import MAX_HISTORY, PART_WEIGHTS, build_step_model

SETTINGS = dict(steps=4, seed=3, height=64, width=64, prompt_weights="a1111")


@pytest.mark.parametrize(
    ("prompt", "parts"),
    [
        ("a castle AND a dragon :0.7", (("a castle", 1.0), (" a dragon", 0.7))),
        ("a cat :0.5", (("a cat", 0.5),)),  # a weight without AND, as the web UI reads it
        ("a cat:1.2 ", (("a cat", 1.2),)),
        ("a AND b AND c :-1", (("a", 1.0), (" b", 1.0), (" c", -1.0))),
        ("a cat :.5", (("a cat", 0.5),)),
        ("a (cat:1.2)", (("a (cat:1.2)", 1.0),)),  # a group's weight is the part's text
        ("ANDROID, a cat and a dog, BAND", (("ANDROID, a cat and a dog, BAND", 1.0),)),
        ("[a cat AND a dog:a fox:0.5]", (("[a cat", 1.0), (" a dog:a fox:0.5]", 1.0))),  # AND splits first
    ],
)
def test_parts_are_read_as_the_web_ui_reads_them(prompt, parts):
    assert prompt_parts(prompt) == parts


def test_plain_prompts_are_not_composable_and_short_ones_are_padded():
    assert composable_parts(["a cat", "a (dog:1.3)"]) == ()
    parts = composable_parts(["a cat AND a hat :0.5", "a fox"])
    assert part_texts(parts) == ["a cat", "a fox", " a hat", ""]
    np.testing.assert_array_equal(part_weights(parts)[..., 0, 0, 0], [[1.0, 1.0], [0.5, 0.0]])
    request = make_request(["a cat AND a hat :0.5", "a fox"], "blur", batch=2, **SETTINGS)
    assert request.copies == 3 and request.texts == ["blur", "blur", *part_texts(parts)]
    assert make_request("a cat AND a hat", **{**SETTINGS, "prompt_weights": "compel"}).composable == ()


@pytest.mark.parametrize("guidance", [True, False], ids=["guided", "no-negative-side"])
def test_the_step_model_sums_each_parts_weighted_pull(guidance):
    """With guidance, the negative side's prediction plus the parts' weighted pulls from it; without (the
    UNet's batch holds the parts alone: perturbed-attention guidance at a scale <= 1), their weighted sum."""
    batch, latent = 2, (4, 3, 5)
    model = build_step_model(batch=batch, latent_shape=latent, num_calls=1, guidance=guidance, parts=3)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    noise_pred = rng.standard_normal(((3 + guidance) * batch, *latent)).astype(np.float32)
    weights = rng.standard_normal((3, batch, 1, 1, 1)).astype(np.float32)
    coeffs = np.zeros((1, 1 + MAX_HISTORY, 3 + MAX_HISTORY), np.float32)
    coeffs[0, 0, 1] = 1.0  # the next sample is the guided prediction itself
    feeds = {
        "noise_pred": noise_pred,
        "sample": np.zeros((batch, *latent), np.float32),
        "history": np.zeros((MAX_HISTORY, batch, *latent), np.float32),
        "step_index": np.array(0, np.int64),
        "coeffs": coeffs,
        "timesteps": np.zeros(2, np.float32),
        "input_scales": np.ones(2, np.float32),
        "noise": np.zeros((1, batch, *latent), np.float32),
        "guidance": np.array(6.0, np.float32),
        PART_WEIGHTS: weights[None],  # the one call's row
    }
    guided = session.run(["next_sample"], feeds)[0]
    if guidance:
        uncond, conds = noise_pred[:batch], noise_pred[batch:].reshape(3, batch, *latent)
        expected = uncond + 6.0 * sum(weights[k] * (conds[k] - uncond) for k in range(3))
    else:
        conds = noise_pred.reshape(3, batch, *latent)
        expected = sum(weights[k] * conds[k] for k in range(3))
    np.testing.assert_allclose(guided, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="without guidance rescale"):
        build_step_model(batch=1, latent_shape=latent, num_calls=1, guidance=True, parts=2, rescale=True)


def same(pipe: Pipeline, a: tuple[str, float], b: tuple[str, float], **settings) -> None:
    """``pipe`` makes the same latents from prompt ``a`` at its guidance as from ``b`` at its."""
    ours = pipe(a[0], guidance=a[1], **{**SETTINGS, **settings}).latents
    theirs = pipe(b[0], guidance=b[1], **{**SETTINGS, **settings}).latents
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_a_part_twice_pulls_twice_as_hard(ort_pipe_fp32):
    same(ort_pipe_fp32, ("a cat AND a cat", 3.5), ("a cat", 7.0))
    same(ort_pipe_fp32, ("a cat AND a cat", 0.5), ("a cat", 1.0))  # the negative side runs even at 0.5
    same(ort_pipe_fp32, ("a cat :0.5", 7.0), ("a cat", 3.5))
    same(ort_pipe_fp32, ("a cat AND a dog :0", 7.0), ("a cat", 7.0), scheduler="euler_a")


def test_parts_add_up_in_any_order(ort_pipe_fp32):
    same(ort_pipe_fp32, ("a cat AND a dog", 5.0), ("a dog AND a cat", 5.0))
    both = ort_pipe_fp32("a cat AND a dog", **SETTINGS).array
    assert psnr(both, ort_pipe_fp32("a cat", **SETTINGS).array) < 60
    assert psnr(both, ort_pipe_fp32("a dog", **SETTINGS).array) < 60


def test_each_part_keeps_its_edits_and_weights(ort_pipe_fp32):
    same(ort_pipe_fp32, ("[a cat:a dog:0.5] AND [a cat:a dog:0.5]", 3.0), ("[a cat:a dog:0.5]", 6.0))
    same(ort_pipe_fp32, ("(a red:1.3) cat AND (a red:1.3) cat", 3.0), ("(a red:1.3) cat", 6.0))


def test_an_image_of_a_batch_is_the_image_its_prompt_makes_alone(ort_pipe_fp32):
    batch = ort_pipe_fp32(["a cat AND a hat :0.6", "a fox"], batch=2, **SETTINGS)
    first = ort_pipe_fp32("a cat AND a hat :0.6", **SETTINGS)
    second = ort_pipe_fp32("a fox", **{**SETTINGS, "seed": SETTINGS["seed"] + 1})
    np.testing.assert_allclose(batch.latents[:1], first.latents, rtol=0, atol=1e-4)
    np.testing.assert_allclose(batch.latents[1:], second.latents, rtol=0, atol=1e-4)


def test_the_bound_loop_matches_the_host_loop(ort_pipe_fp32):
    from sdengine.backends.ort_cuda import OrtCudaBackend

    host = ort_pipe_fp32
    bound = Pipeline(host.model_dir, OrtCudaBackend(host.model_dir, device="cpu"), host.tokenizer)
    prompt = "a cat AND [a dog:a fox:0.5] :0.5"
    np.testing.assert_allclose(
        bound(prompt, **SETTINGS).latents, host(prompt, **SETTINGS).latents, rtol=0, atol=1e-4
    )


def test_what_cannot_be_composed_is_refused(tiny_checkpoint):
    with pytest.raises(InvalidArgumentError, match="guidance_rescale rescales one guided prediction"):
        make_request("a cat AND a dog", guidance_rescale=0.7, **SETTINGS)
    torch_pipe = Pipeline.load(tiny_checkpoint, backend="torch")
    with pytest.raises(UnsupportedConfigError, match="composable prompts .* run on the ort and trt"):
        torch_pipe("a cat AND a dog", **SETTINGS)
