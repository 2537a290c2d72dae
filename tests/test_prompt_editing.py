"""Prompt editing in the AUTOMATIC1111 web UI's syntax: its parser's documented examples, which texts each
call reads, the step model's hand-over of each call's embeddings, and end to end against diffusers fed the
same embeddings call by call."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from export.checkpoint import SD15_SCHEDULER_CONFIG
from sdengine.images import psnr
from sdengine.pipeline import Pipeline
from sdengine.prompt_editing import prompt_edits, prompt_schedule, text_at
from sdengine.schedulers import load_scheduler
from sdengine.step_graph import CONTEXT_OUTPUT, MAX_HISTORY, build_step_model, step_tables

SETTINGS = dict(steps=4, seed=5, height=64, width=64, prompt_weights="a1111")


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [  # the examples of the web UI's get_learned_conditioning_prompt_schedules docstring (10 steps)
        ("test", [(10, "test")]),
        ("a [b:3]", [(3, "a "), (10, "a b")]),
        ("a [b: 3]", [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [unbalanced", [(10, "a [unbalanced")]),
        ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
        ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
        # and what follows from its grammar
        ("[a|]", [(s, "a" if s % 2 else "") for s in range(1, 11)]),  # an empty option
        ("[a:b: 3 ]", [(3, "a"), (10, "b")]),  # spaces around the step
        ("[a:b:0]", [(10, "b")]),  # switches before the first step: never read
        ("[a:b:-2]", [(10, "b")]),
        ("[a:b:25]", [(10, "a")]),  # after the last step: cut to it
        ("[a:b:1e0]", [(1, "a"), (10, "b")]),
        ("[a:b:0.29]", [(2, "a"), (10, "b")]),  # int(0.29 * 10): a share rounds down
        ("(x [a:b:2]:1.3) \\[c:d:1\\]", [(2, "(x a:1.3) \\[c:d:1\\]"), (10, "(x b:1.3) \\[c:d:1\\]")]),
        ("[dog] (cat:1.2) [a:b]", [(10, "[dog] (cat:1.2) [a:b]")]),  # weights and stray brackets stay
        ("a | [b:3]", [(10, "a | [b:3]")]),  # a bar outside brackets: the web UI reads all of it as text
        ("[b:3] x\\", [(10, "[b:3] x\\")]),  # ... as a lone backslash at the end
    ],
)
def test_schedules_as_the_web_ui(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_the_web_ui_source_comment_example():
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_the_wiki_examples_step_by_step():
    landscape = prompt_schedule("a [fantasy:cyberpunk:16] landscape", 100)
    assert [text_at(landscape, s) for s in (1, 16, 17, 100)] == [
        "a fantasy landscape",
        "a fantasy landscape",
        "a cyberpunk landscape",  # "after step 16"
        "a cyberpunk landscape",
    ]
    field = prompt_schedule("[cow|horse] in a field", 20)
    assert [text_at(field, s) for s in (1, 2, 3)] == ["cow in a field", "horse in a field", "cow in a field"]


def test_each_call_reads_its_steps_texts():
    edits = prompt_edits(["[a|b] x", "c", "[d:e:2]"], steps=4, calls=7)  # two calls a step, as Heun's
    assert edits.texts == ["a x", "c", "d", "b x", "e"]
    assert edits.rows.tolist() == [[0, 1, 2], [3, 1, 2], [0, 1, 4], [3, 1, 4]]  # in the order first read
    assert edits.call_rows.tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert edits.edited
    plain = prompt_edits(["a (red:1.2) cat", "a (red:1.2) cat"], steps=4, calls=5)  # PNDM: one call more
    assert (plain.texts, plain.rows.tolist(), plain.call_rows.tolist()) == (
        ["a (red:1.2) cat"],
        [[0, 0]],
        [0] * 5,
    )
    assert not plain.edited


@pytest.mark.parametrize("context_type", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_the_step_model_gives_each_next_call_its_set(context_type):
    schedule = load_scheduler("euler", {"_class_name": "PNDMScheduler", **SD15_SCHEDULER_CONFIG}).schedule(5)
    batch, latent, sets, sequence, hidden = 1, (4, 2, 2), 3, 6, 8
    rng = np.random.default_rng(0)
    contexts = rng.standard_normal((sets, 2 * batch, sequence, hidden)).astype(np.float32)
    index = np.array([0, 2, 2, 1, 0])
    tables = step_tables(
        schedule, np.zeros((5, batch, *latent), np.float32), contexts=contexts, context_index=index
    )
    model = build_step_model(
        batch=batch,
        latent_shape=latent,
        num_calls=5,
        guidance=True,
        contexts=(sets, sequence, hidden),
        context_dtype=context_type,
    )
    run = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    state = {
        "sample": np.zeros((batch, *latent), np.float32),
        "history": np.zeros((MAX_HISTORY, batch, *latent), np.float32),
        "step_index": np.array(0, np.int64),
    }
    assert tables.outputs()[-1] == CONTEXT_OUTPUT
    for call in range(5):
        feed = {
            "noise_pred": np.zeros((2 * batch, *latent), np.float32),
            "guidance": np.array(7.5, np.float32),
        }
        out = dict(
            zip(
                tables.outputs(), run.run(tables.outputs(), {**feed, **state, **tables.inputs()}), strict=True
            )
        )
        expected = contexts[index[min(call + 1, 4)]]
        assert out[CONTEXT_OUTPUT].dtype == (
            np.float16 if context_type == TensorProto.FLOAT16 else np.float32
        )
        np.testing.assert_array_equal(out[CONTEXT_OUTPUT], expected.astype(out[CONTEXT_OUTPUT].dtype))
        state = {
            "sample": out["next_sample"],
            "history": out["next_history"],
            "step_index": out["next_step_index"],
        }


@pytest.fixture(scope="module")
def pipes(biased_pipes):
    return biased_pipes


RED, BLUE = "a photo of a red cat", "a photo of a (blue:1.3) dog"
EDITED = "a photo of a [red cat:(blue:1.3) dog:0.5]"
IMAGE = np.linspace(0, 1, 64 * 64 * 3, dtype=np.float32).reshape(64, 64, 3)
LONG = ", ".join(["a big red cat"] * 12)


@pytest.mark.parametrize(
    ("prompt", "negative", "extra"),
    [
        (EDITED, "blurry", {}),
        (EDITED, "blurry", {"scheduler": "heun"}),  # two calls a step, both reading their step's text
        (EDITED, "blurry", {"guidance": 1.0}),  # no classifier-free guidance: the prompts alone
        ("a photo of a [cat|dog]", "[blurry::1]", {"scheduler": "euler_a"}),  # alternating; negative edited
        (EDITED, "blurry", {"image": IMAGE, "strength": 0.75, "steps": 8}),  # the 6 steps that run
        (f"a photo of a [cat:{LONG}:2]", "blurry", {"long_prompts": True}),  # one window, then three
        ([EDITED, RED], "blurry", {}),  # a batch: one prompt edited, one not
    ],
)
def test_matches_diffusers_fed_each_calls_embeddings(pipes, prompt, negative, extra):
    settings = {**SETTINGS, **extra}
    ours, ref = (pipe(prompt, negative, **settings) for pipe in pipes)
    assert psnr(ours.array, ref.array) >= 100
    if prompt == EDITED:  # neither the text before the switch nor the one after
        for text in (RED, BLUE):
            assert psnr(ours.array, pipes[0](text, negative, **settings).array) < 90


def test_a_prompt_that_reads_one_text_runs_as_that_text(pipes):
    a = pipes[0]("a photo of a (red:1.2) cat", "blurry", **SETTINGS)
    for same in ("a photo of a [(red:1.2):blue:9] cat", "a photo of a [(red:1.2)|(red:1.2)] cat"):
        np.testing.assert_array_equal(pipes[0](same, "blurry", **SETTINGS).latents, a.latents)  # one set


def test_the_device_loop_hands_each_call_its_embeddings(pipes):
    """The GPU backend's bound loop (run on the CPU provider): the step model writes each next call's text
    embeddings into the UNet's bound input; runs with and without edits, and with other numbers of sets,
    share the backend."""
    from sdengine.backends.ort_cuda import OrtCudaBackend

    host = pipes[0]
    bound = Pipeline(host.model_dir, OrtCudaBackend(host.model_dir, device="cpu"), host.tokenizer)
    for prompt in (EDITED, RED, "a [cat|dog|fox] [sitting::2]", EDITED):
        a, b = bound(prompt, "blurry", **SETTINGS), host(prompt, "blurry", **SETTINGS)
        scale = float(np.abs(b.latents).max())
        np.testing.assert_allclose(a.latents, b.latents, rtol=0, atol=1e-5 * scale, err_msg=prompt)
    assert sorted(key.context_sets for key in bound.backend._denoisers) == [0, 2, 4]
