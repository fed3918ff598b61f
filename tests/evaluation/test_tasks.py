"""Task generators: exact lengths, determinism, the facts really in the prompt, the answer check."""

import re
from collections import Counter

import pytest
from transformers import AutoTokenizer

from chelsea.models import resolve
from chelsea.evaluation.tasks import NEEDLE_DEPTHS, PLACEMENTS, QUESTION_TASKS, TaskBuilder, score


@pytest.fixture(scope="module")
def tokenizer():
    path, extra = resolve("smollm2-135m")
    return AutoTokenizer.from_pretrained(path, **extra)


@pytest.fixture(scope="module")
def builder(tokenizer):
    return TaskBuilder(tokenizer, seed=0)


@pytest.mark.parametrize("task", QUESTION_TASKS)
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_exact_length_and_answers_in_the_prompt(builder, tokenizer, task, placement):
    for length in (700, 1500):
        s = builder.sample(task, length, placement, 2)
        assert len(s.input_ids) == length
        text = tokenizer.decode(s.input_ids)
        for answer in s.answers:
            assert answer in text
        question_at = text.index(s.meta["question"])
        # the question sits after all the facts, or before all of them
        fact_positions = [text.index(a) for a in s.answers]
        if placement in ("after", "agnostic", "streamed"):
            assert question_at > max(fact_positions)
        elif task != "cwe":  # cwe's question names no answer; for the others the prompt must not end by naming a key
            assert question_at < min(fact_positions)


@pytest.mark.parametrize("task", QUESTION_TASKS)
def test_deterministic_for_a_seed_and_different_across_seeds(tokenizer, builder, task):
    again = TaskBuilder(tokenizer, seed=0)
    other = TaskBuilder(tokenizer, seed=1)
    a = builder.sample(task, 800, "after", 3)
    assert a.input_ids == again.sample(task, 800, "after", 3).input_ids and a.answers == again.sample(task, 800, "after", 3).answers
    assert a.answers != other.sample(task, 800, "after", 3).answers
    assert a.answers != builder.sample(task, 800, "after", 4).answers
    # the two placements ask about the same facts
    assert builder.sample(task, 800, "before", 3).answers == a.answers


def test_needle_depths_cycle_and_place_the_fact(builder, tokenizer):
    positions = []
    for i, depth in enumerate(NEEDLE_DEPTHS):
        s = builder.sample("needle", 2000, "after", i)
        assert s.depth == depth
        text = tokenizer.decode(s.input_ids)
        positions.append(text.index(s.answers[0]) / len(text))
    assert positions == sorted(positions) and positions[-1] - positions[0] > 0.6


@pytest.mark.parametrize("task", ["needle", "multivalue", "vartrack", "cwe"])
def test_agnostic_is_the_after_prompt_cut_where_the_context_ends(builder, tokenizer, task):
    after, agnostic = builder.sample(task, 900, "after", 1), builder.sample(task, 900, "agnostic", 1)
    assert agnostic.input_ids == after.input_ids and after.context_end is None
    context = tokenizer.decode(agnostic.input_ids[: agnostic.context_end])
    rest = tokenizer.decode(agnostic.input_ids[agnostic.context_end :])
    assert all(a in context for a in agnostic.answers) and not any(a in rest for a in agnostic.answers)
    assert agnostic.meta["question"] in rest and agnostic.meta["question"] not in context


def test_before_placement_ends_without_the_key(builder, tokenizer):
    s = builder.sample("needle", 1000, "before", 0)
    key = re.search(r"number for (\w+)", s.meta["question"]).group(1)
    tail = tokenizer.decode(s.input_ids[-40:])
    assert key not in tail
    assert key in tokenizer.decode(builder.sample("needle", 1000, "after", 0).input_ids[-40:])


def test_cwe_common_words_are_the_most_frequent(builder, tokenizer):
    s = builder.sample("cwe", 3000, "after", 0)
    words = re.findall(r"^\d+\. (\w+)$", tokenizer.decode(s.input_ids), re.MULTILINE)
    counts = Counter(words)
    top = {w for w, _ in counts.most_common(5)}
    assert top == set(s.answers)
    assert min(counts[w] for w in top) >= 3 * max(c for w, c in counts.items() if w not in top)


def test_vartrack_chain_is_complete(builder, tokenizer):
    s = builder.sample("vartrack", 1500, "after", 0)
    text = tokenizer.decode(s.input_ids)
    value = re.search(r"assigned the value (\d+)", s.meta["question"]).group(1)
    assert f"VAR {s.answers[0]} = {value}." in text
    for a, b in zip(s.answers, s.answers[1:]):
        assert f"VAR {b} = VAR {a}." in text


def test_score_accepts_the_answer_and_rejects_others():
    assert score("The pass key is 12345.", ["12345"]) == 1.0
    assert score("The pass key is 123456.", ["12345"]) == 0.0
    assert score("It is 512345", ["12345"]) == 0.0
    assert score("tyrant, GAMES and linearly", ["tyrant", "games", "linearly", "newly"]) == 0.75
    with pytest.raises(ValueError):
        score("anything", [])


def test_ppl_samples_are_exact_and_seeded(builder):
    a = builder.ppl_sample(600, 1)
    assert len(a.input_ids) == 600 and a.input_ids == builder.ppl_sample(600, 1).input_ids
    assert a.input_ids != builder.ppl_sample(600, 2).input_ids


def test_too_short_lengths_are_refused(builder):
    from chelsea import ChelseaError

    with pytest.raises(ChelseaError, match="longer length"):
        builder.sample("cwe", 100, "after", 0)


def test_before_placement_leaves_room_to_restate_the_question(builder, tokenizer):
    for task in ("needle", "multikey", "vartrack"):
        after, before = builder.sample(task, 1000, "after", 0), builder.sample(task, 1000, "before", 0)
        # a reply that first repeats the reply prefix the "after" prompt gives, then the answers
        restated = len(tokenizer(" " + after.meta["question"], add_special_tokens=False).input_ids)
        assert before.max_new_tokens >= after.max_new_tokens + restated - 4
