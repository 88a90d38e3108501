"""CrossCheck scoring: splitting, aggregation (hand-computed), ranking, correlations."""

import math

import numpy as np
import pytest

from clearsight.evals import (
    EmbeddingScorer,
    EvalInputError,
    PromptJudgeScorer,
    SentenceScorer,
    correlate,
    crosscheck_explicit,
    pearson,
    rank_systems,
    spearman,
    split_sentences,
)
from clearsight.evals.metrics.crosscheck import (
    aggregate_sample,
    implicit_answer_to_score,
    judge_answer_to_score,
    rankdata,
)


class LastWordScorer:
    """0 if the sentence's last word occurs in the evidence, else 1 (a transparent fake scorer)."""

    name = "last-word"

    def score(self, sentences, evidence):
        words = set(evidence.replace(".", " ").lower().split())
        return [0.0 if s.rstrip(".").split()[-1].lower() in words else 1.0 for s in sentences]


OUTPUTS = {
    "A": {"s1": "There is a red cat. There is a blue dog.", "s2": "I see a green car."},
    "B": {"s1": "There is a red cat. Ok then.", "s2": "I see a green car."},
    "C": {"s1": "There is a red cat. There is a blue dog.", "s2": "I see a green bus."},
}


def test_split_sentences_drops_short():
    # "Ok then!" (2 tokens) and "Yes." (1) are dropped; "Is it a dog?" has 4 tokens and stays
    assert split_sentences("A cat sits on a mat. Ok then! Is it a dog? Yes.") == [
        "A cat sits on a mat.", "Is it a dog?"]
    assert split_sentences("Is it a dog? Is it?") == ["Is it a dog?"]
    assert split_sentences("one two three four. five six seven") == ["one two three four."]
    assert split_sentences("   ") == []


def test_explicit_aggregation_hand_computed():
    assert isinstance(LastWordScorer(), SentenceScorer)
    res = crosscheck_explicit(OUTPUTS, LastWordScorer())
    # A: s1 cat (B 0, C 0) -> 0, dog (B 1, C 0) -> 0.5, sample 0.25; s2 car (B 0, C 1) -> 0.5; A = 0.375
    # B: s1 cat -> 0 ("Ok then." dropped); s2 car (A 0, C 1) -> 0.5; B = 0.25
    # C: s1 cat 0, dog (A 0, B 1) 0.5 -> 0.25; s2 bus (A 1, B 1) -> 1; C = 0.625
    assert res.scores == pytest.approx({"A": 0.375, "B": 0.25, "C": 0.625})
    assert res.ranking == ["B", "A", "C"]
    assert res.n_sentences == {"A": 3, "B": 2, "C": 3}
    assert res.skipped_samples == {"A": 0, "B": 0, "C": 0}
    # restricted evidence pool: only B as evidence (B itself is then scored against nothing -> error)
    with pytest.raises(EvalInputError, match="no evidence system other than 'B'"):
        crosscheck_explicit(OUTPUTS, LastWordScorer(), evidence_systems=["B"])
    res_b = crosscheck_explicit({"A": OUTPUTS["A"], "B": OUTPUTS["B"]}, LastWordScorer())
    assert res_b.scores["A"] == pytest.approx(np.mean([np.mean([0, 1]), 0]))


def test_aggregate_sample_order_of_means():
    # mean over evidence first ([0, 1] -> 0.5; [1] -> 1), then over sentences -> 0.75 (not 2/3 pooled)
    assert aggregate_sample([[0.0, 1.0], [1.0]]) == pytest.approx(0.75)
    assert aggregate_sample([]) is None


def test_ranking_and_correlations_hand_computed():
    assert rank_systems({"x": 0.3, "y": 0.1, "z": 0.3}) == ["y", "x", "z"]
    assert rank_systems({"x": 0.3, "y": 0.1}, higher_is_better=True) == ["x", "y"]
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 38 / 3))
    assert list(rankdata([1, 2, 2, 3])) == [1, 2.5, 2.5, 4]
    assert spearman([1, 2, 2, 3], [4, 3, 2, 1]) == pytest.approx(-4.5 / math.sqrt(4.5 * 5))
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    c = correlate({"A": 0.375, "B": 0.25, "C": 0.625, "D": 0.9}, {"A": 0.2, "B": 0.1, "C": 0.5}, "CHAIR_i")
    assert c.systems == ["A", "B", "C"] and c.spearman == pytest.approx(1.0)
    assert c.pearson == pytest.approx(np.corrcoef([0.375, 0.25, 0.625], [0.2, 0.1, 0.5])[0, 1])
    with pytest.raises(EvalInputError, match="only 1 system"):
        correlate({"A": 1.0}, {"A": 2.0})


def test_embedding_scorer_with_fake_embedding():
    vocab = ["cat", "dog", "car", "sits", "runs"]

    def embed(texts):
        return np.array([[t.lower().count(w) for w in vocab] for t in texts], dtype=float)

    s = EmbeddingScorer(embed)
    out = s.score(["The cat sits.", "The car runs."], "A dog runs. The cat sits.")
    assert out[0] == pytest.approx(0.0)  # identical to an evidence sentence
    assert out[1] == pytest.approx(1 - 1 / 2)  # cos((car, runs), (dog, runs)) = 1/2
    assert s.score(["The cat sits."], "") == [1.0]
    bad = EmbeddingScorer(lambda texts: np.zeros((1, 3)))
    with pytest.raises(EvalInputError, match="one row per text"):
        bad.score(["a b c d", "e f g h"], "x")


def test_judge_mappings_and_prompt_scorer():
    assert [judge_answer_to_score(a) for a in ["Yes.", " no", "Maybe"]] == [0.0, 1.0, 0.5]
    assert [implicit_answer_to_score(a) for a in ["YES", "NO.", "unsure"]] == [1.0, 0.0, 0.5]
    prompts = []

    def gen(prompt):
        prompts.append(prompt)
        return "Yes" if "cat" in prompt.split("Sentence:")[1] else "No"

    j = PromptJudgeScorer(gen)
    assert j.score(["A cat is here.", "A dog is here."], "ctx") == [0.0, 1.0]
    assert prompts[0].startswith("Context: ctx\nSentence: A cat is here.")


def test_bad_inputs():
    with pytest.raises(EvalInputError, match="at least 2 systems"):
        crosscheck_explicit({"A": OUTPUTS["A"]}, LastWordScorer())
    with pytest.raises(EvalInputError, match="cover different samples"):
        crosscheck_explicit({"A": OUTPUTS["A"], "B": {"s1": "x"}}, LastWordScorer())
    with pytest.raises(EvalInputError, match="evidence system 'Z' has no outputs"):
        crosscheck_explicit(OUTPUTS, LastWordScorer(), evidence_systems=["Z"])
    with pytest.raises(EvalInputError, match="no sample has a sentence"):
        crosscheck_explicit({"A": {"1": "Ok."}, "B": {"1": "Fine."}}, LastWordScorer())
    with pytest.raises(EvalInputError, match="empty dataset"):
        crosscheck_explicit({"A": {}, "B": {}}, LastWordScorer())


def test_embedding_scorer_embeds_each_text_once():
    """Sentences serve as target once and as evidence for every other system: one embed() per distinct text."""
    seen: list[str] = []

    def embed(texts):
        seen.extend(texts)
        return np.array([[len(t), 1.0] for t in texts])

    scorer = EmbeddingScorer(embed)
    first = scorer.score(["A red circle here.", "A blue star there."], "A red circle here.")
    again = scorer.score(["A red circle here."], "A blue star there. A red circle here.")
    assert first[0] == pytest.approx(0.0) and again == [pytest.approx(0.0)]
    assert sorted(seen) == ["A blue star there.", "A red circle here."]


def test_correlation_edges_found_by_mutation_testing():
    """docs/testing.md, metrics survivors: the smallest valid inputs, each malformed input, the messages,
    ties at the end of the order, the silent constant case and the default names."""
    import warnings

    assert pearson([1, 2], [2, 1]) == pytest.approx(-1.0)  # two values are enough
    for x, y in (([1, 2], [1, 2, 3]), ([[1, 2], [3, 4]], [[1, 2], [3, 4]]), ([1], [1])):
        with pytest.raises(EvalInputError) as err:
            pearson(x, y)
        assert str(err.value).startswith("pearson: need two equal-length sequences of >= 2 values, got ")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a constant side is NaN by rule, not by a 0 / 0 division
        assert math.isnan(pearson([2, 2, 2], [1, 2, 3]))
    assert list(rankdata([3, 1, 3])) == [2.5, 1, 2.5]  # a tie among the last two of the order
    assert list(rankdata([5, 5, 1, 5])) == [3, 3, 1, 3]
    c = correlate({"A": 1.0, "B": 2.0}, {"A": 1.0, "B": 3.0})  # two common systems are enough
    assert (c.reference, c.systems, c.pearson) == ("reference", ["A", "B"], pytest.approx(1.0))
    with pytest.raises(EvalInputError) as err:
        correlate({"A": 1.0}, {"B": 1.0}, "CHAIR_i")
    assert str(err.value) == "correlate: only 0 system(s) have both scores and CHAIR_i; need >= 2"
    assert PromptJudgeScorer(lambda p: "Yes").name == "judge"
    assert PromptJudgeScorer(lambda p: "Yes", name="gpt").name == "gpt"


def test_embedding_scorer_edges_found_by_mutation_testing():
    """docs/testing.md, metrics survivors: zero and anti-parallel embeddings, a cosine that rounds above 1,
    the evidence fallbacks, the default name and minimum sentence length, the messages."""
    vec = {"zero": [0.0, 0.0, 0.0], "up": [1.0, 0.0, 0.0], "down": [-1.0, 0.0, 0.0],
           "odd": [0.9034701816518086, 0.09401229776087457, -0.7434992493538084]}  # 1 - u.u = -2.2e-16

    def embed(texts):
        return np.array([vec[t.strip(".").split()[-1]] for t in texts])

    s = EmbeddingScorer(embed)
    assert s.name == "embedding" and EmbeddingScorer(embed, name="e5").name == "e5"
    assert s.score(["A zero."], "An up.") == [1.0]  # a zero vector: similarity 0, no 0 / 0
    assert s.score(["An up."], "A down.") == [1.0]  # cosine -1: clipped to 1
    assert s.score(["An odd."], "An odd.") == [0.0]  # a cosine rounded above 1: clipped to 0
    # every evidence sentence shorter than min_tokens: the whole evidence is the one sentence
    assert EmbeddingScorer(embed, min_tokens=5).score(["An up."], "An up.") == [0.0]
    ones = EmbeddingScorer(lambda texts: np.ones((len(texts), 2)))
    assert ones.score(["Any text."], "   ") == [1.0]  # blank evidence supports nothing
    # the default keeps one-word evidence sentences
    words = EmbeddingScorer(lambda texts: np.array([[t.count("Up"), t.count("down")] for t in texts], float))
    assert words.score(["Up."], "Up. Goes down.") == [0.0]
    with pytest.raises(EvalInputError) as err:
        EmbeddingScorer(lambda texts: np.zeros((1, 3)), name="e").score(["a b", "c d"], "x")
    assert str(err.value) == "e: embed() returned 1 rows for 2 texts; it must return one row per text"
    with pytest.raises(EvalInputError) as err:
        EmbeddingScorer(lambda texts: np.zeros(3)).score(["a b"], "x")
    assert str(err.value) == "embed() must return a 2-D array, got shape (3,)"


def test_explicit_messages_and_skipped_samples_found_by_mutation_testing():
    """docs/testing.md, metrics survivors: the messages in full (the first id only one system has), a
    sample without a long sentence before one with, and min_tokens reaching the sentence split."""
    with pytest.raises(EvalInputError) as err:
        crosscheck_explicit({"A": {"1": "x", "2": "y"}, "B": {"1": "x", "3": "y"}, "C": {"1": "x"}},
                            LastWordScorer())
    assert str(err.value) == ("CrossCheck: systems 'A' and 'B' cover different samples (first differing id: 2); "
                              "generate the same samples for all systems")
    with pytest.raises(EvalInputError) as err:
        crosscheck_explicit({"A": {}, "B": {}}, LastWordScorer())
    assert str(err.value) == "CrossCheck: empty dataset; no samples in the outputs"
    with pytest.raises(EvalInputError) as err:
        crosscheck_explicit({"A": {"1": "Ok."}, "B": {"1": "Fine."}}, LastWordScorer())
    assert str(err.value) == "CrossCheck: no sample has a sentence of >= 4 tokens; nothing to score"
    with pytest.raises(EvalInputError) as err:
        crosscheck_explicit({"A": {"1": "x"}}, LastWordScorer())
    assert str(err.value) == "CrossCheck needs outputs of at least 2 systems on the same samples"
    outs = {"A": {"0": "Ok.", "1": "There is a red cat."}, "B": {"0": "Fine.", "1": "There is a red dog."}}
    res = crosscheck_explicit(outs, LastWordScorer())
    assert res.scores == {"A": 1.0, "B": 1.0} and res.n_sentences == {"A": 1, "B": 1}
    short = crosscheck_explicit({"A": {"1": "A cat."}, "B": {"1": "A dog."}}, LastWordScorer(), min_tokens=2)
    assert short.n_sentences == {"A": 1, "B": 1}
