"""Prompt editing in the AUTOMATIC1111 web UI's syntax: prompts that change part way through the schedule.

The syntax, as the web UI documents it (its wiki's "Features" page, and the examples in its
``modules/prompt_parser.py``):

- ``[from:to:when]``: ``from`` until step ``when``, then ``to``. ``when`` below 1 is a share of the steps
  (``0.25`` of 20 steps is step 5), otherwise a step number; it is cut to a whole step and to the last one.
- ``[to:when]`` adds ``to`` after step ``when``; ``[from::when]`` removes ``from`` after it.
- ``[cow|horse]`` alternates, one option per step: step 1 reads ``cow``, step 2 ``horse``, step 3 ``cow``.
- They nest (``a [b:[c:d:2]:1] e``), and their texts may hold weights: ``[(cat:1.3):dog:0.5]``. Brackets that
  make none of these (``[dog]``, an unbalanced ``(``) are left as they are, for the weights to read.
- A ``|`` outside any brackets, or a lone backslash at the end, makes the whole prompt plain text, as the web
  UI's parser gives up on it.

Steps are counted from 1 over the steps that run (image to image runs fewer than asked for), and step ``s``
reads a ``[from:to:when]`` as ``from`` while ``s <= when``: ``[fantasy:cyberpunk:16]`` draws a fantasy
landscape for 16 steps and a cyberpunk one from step 17 on, as the wiki says. (The web UI's sampler counts
its steps from 0 against the same schedule, so there each switch comes one step later.) A scheduler that
calls the UNet twice a step (Heun's, DPM2) reads the same text in both calls.

Each UNet call gets the embeddings of its texts: :func:`prompt_edits` gives the distinct texts to encode and,
per call, which of them each prompt reads; the step model hands each next call its row
(:mod:`sdengine.step_graph`), so an edited prompt costs no host work between the steps either.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Text that is neither bracket, colon nor bar, with backslash escapes (kept: the weights read them).
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
#: A switch step and the bracket that ends it: ``[+-]`` digits, a point, an exponent; spaces either side.
_WHEN = re.compile(r"\s*([+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)\s*\]")


@dataclass(frozen=True)
class _Scheduled:
    before: tuple  # nodes
    after: tuple
    when: float


@dataclass(frozen=True)
class _Alternate:
    options: tuple  # of node tuples


def _parse(prompt: str) -> tuple | None:
    """``prompt`` as nodes (text, :class:`_Scheduled`, :class:`_Alternate`); brackets that start nothing are
    text; None where the web UI's parser fails (a ``|`` outside brackets, a backslash that escapes
    nothing)."""
    nodes: list = []
    i = 0
    while i < len(prompt):
        element = _element(prompt, i)
        if element is not None:
            nodes += element[0]
            i = element[1]
        elif prompt[i] in "[]():":
            nodes.append(prompt[i])
            i += 1
        else:  # "|" or a lone backslash
            return None
    return tuple(nodes)


def _sequence(s: str, i: int) -> tuple[list, int]:
    """The elements from ``i`` on, up to the first character that starts none."""
    nodes: list = []
    while (element := _element(s, i)) is not None:
        nodes += element[0]
        i = element[1]
    return nodes, i


def _element(s: str, i: int) -> tuple[list, int] | None:
    """One element at ``i`` (plain text, a group in brackets) and where it ends; None where none starts."""
    if i >= len(s):
        return None
    if (plain := _PLAIN.match(s, i)) is not None:
        return [plain.group()], plain.end()
    if s[i] == "(":
        return _round(s, i)
    if s[i] == "[":
        return _square(s, i)
    return None


def _at(s: str, i: int) -> str:
    return s[i] if i < len(s) else ""


def _round(s: str, i: int) -> tuple[list, int] | None:
    """``(text)`` or ``(text:text)``: a weighted group, kept as text (edits inside still apply)."""
    first, j = _sequence(s, i + 1)
    if _at(s, j) == ")":
        return ["(", *first, ")"], j + 1
    if _at(s, j) == ":":
        second, k = _sequence(s, j + 1)
        if _at(s, k) == ")":
            return ["(", *first, ":", *second, ")"], k + 1
    return None


def _square(s: str, i: int) -> tuple[list, int] | None:
    """``[to:when]``, ``[from:to:when]``, ``[a|b|...]``, or ``[text]`` (a weighted group, kept as text)."""
    first, j = _sequence(s, i + 1)
    if _at(s, j) == "]":
        return ["[", *first, "]"], j + 1
    if _at(s, j) == ":":
        if (when := _WHEN.match(s, j + 1)) is not None:
            return [_Scheduled((), tuple(first), float(when.group(1)))], when.end()
        second, k = _sequence(s, j + 1)
        if _at(s, k) == ":" and (when := _WHEN.match(s, k + 1)) is not None:
            return [_Scheduled(tuple(first), tuple(second), float(when.group(1)))], when.end()
        return None
    options = [tuple(first)]
    while _at(s, j) == "|":
        option, j = _sequence(s, j + 1)
        options.append(tuple(option))
    if len(options) > 1 and _at(s, j) == "]":
        return [_Alternate(tuple(options))], j + 1
    return None


def _switch_step(when: float, steps: int) -> int:
    """A ``when`` as a step: a share of ``steps`` below 1, cut to a whole step and to the last."""
    return min(steps, int(when * steps if when < 1 else when))


def _walk(nodes: tuple, steps: int, switches: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            if (step := _switch_step(node.when, steps)) >= 1:
                switches.add(step)
            _walk(node.before, steps, switches)
            _walk(node.after, steps, switches)
        elif isinstance(node, _Alternate):
            switches.update(range(1, steps + 1))
            for option in node.options:
                _walk(option, steps, switches)


def _text(nodes: tuple, step: int, steps: int) -> str:
    """The prompt's text at ``step`` (from 1)."""
    parts = []
    for node in nodes:
        if isinstance(node, _Scheduled):
            parts.append(
                _text(node.before if step <= _switch_step(node.when, steps) else node.after, step, steps)
            )
        elif isinstance(node, _Alternate):
            parts.append(_text(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            parts.append(node)
    return "".join(parts)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """The texts ``prompt`` reads over ``steps`` steps, as (last step, text) pairs in step order: step ``s``
    reads the text of the first pair whose last step is at least ``s``. ``"a [b:3]"`` over 10 steps ->
    ``[(3, "a "), (10, "a b")]``."""
    nodes = _parse(prompt)
    if nodes is None:
        return [(steps, prompt)]
    switches = {steps}
    _walk(nodes, steps, switches)
    return [(step, _text(nodes, step, steps)) for step in sorted(switches)]


def text_at(schedule: list[tuple[int, str]], step: int) -> str:
    """The text a :func:`prompt_schedule` gives at ``step`` (from 1)."""
    return next((text for last, text in schedule if step <= last), schedule[-1][1])


@dataclass(frozen=True, eq=False)
class PromptEdits:
    """What a run's prompts read, call by call: the distinct texts to encode, each distinct set of texts the
    prompts read together (a row of indices into ``texts``, one per prompt), and each UNet call's set."""

    texts: list[str]
    rows: np.ndarray  # (sets, prompts) int64: indices into texts
    call_rows: np.ndarray  # (calls,) int64: indices into rows

    @property
    def edited(self) -> bool:
        """Whether the prompts read more than one set of texts over the run."""
        return len(self.rows) > 1

    def calls(self, start: int, stop: int) -> PromptEdits:
        """What the calls ``start`` to ``stop`` of the run read (one model's part of a run that a base model
        and its refiner share)."""
        return PromptEdits(self.texts, self.rows, self.call_rows[start:stop])


def prompt_edits(prompts: Sequence[str], steps: int, calls: int) -> PromptEdits:
    """The texts ``prompts`` read in each of ``calls`` UNet calls over a run of ``steps`` steps. Call ``c``
    belongs to step ``c * steps // calls + 1``: one call a step for most schedulers; the two calls of a step
    of Heun's and DPM2 (and PNDM's extra first call) read their step's texts."""
    schedules = [prompt_schedule(p, steps) for p in prompts]
    ids: dict[str, int] = {}
    per_call = np.array(
        [
            [ids.setdefault(text_at(schedule, call * steps // calls + 1), len(ids)) for schedule in schedules]
            for call in range(calls)
        ],
        np.int64,
    ).reshape(calls, len(prompts))
    rows: dict[tuple[int, ...], int] = {}  # each distinct set, in the order the calls first read them
    call_rows = [rows.setdefault(tuple(row), len(rows)) for row in per_call.tolist()]
    return PromptEdits(
        list(ids),
        np.array(list(rows), np.int64).reshape(len(rows), len(prompts)),
        np.array(call_rows, np.int64),
    )
