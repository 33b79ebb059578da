"""The tweet corpus loader and the stratified split, on the real corpus."""

from __future__ import annotations

import collections

from training.data import stratified_split
from training.data.sentiment import LABELS, clean_text, load_sentiment


def test_clean_text_repairs_quotes_and_drops_emoji_debris():
    assert clean_text("I donÕ¢_\x8aÎ_\x86¢t want either!") == "I don't want either!"
    assert clean_text("How Uber_Ñés cars") == "How Uber's cars"
    assert clean_text("äóì@user: lineup is here äó_") == '"@user: lineup is here ...'
    assert clean_text("crazed &amp; drunk Õ\x8d\x81ô_\x86¢ë\x8f drivers") == "crazed & drunk drivers"
    assert clean_text("a café in München") == "a café in München"


def test_corpus_loads_all_rows_with_three_labels():
    data = load_sentiment()
    assert len(data) == 38158
    assert data.label_names == LABELS
    counts = collections.Counter(data.labels)
    assert counts == {0: 16186, 1: 15018, 2: 6954}
    assert data.digest() == load_sentiment().digest()


def test_stratified_split_is_disjoint_deterministic_and_keeps_class_shares():
    labels = [0] * 500 + [1] * 300 + [2] * 200
    split = stratified_split(labels, seed=7)
    parts = [set(split.train), set(split.validation), set(split.test)]
    assert sum(len(p) for p in parts) == 1000 and len(set().union(*parts)) == 1000
    assert (len(split.train), len(split.validation), len(split.test)) == (800, 100, 100)
    for part in (split.validation, split.test):
        assert collections.Counter(labels[i] for i in part) == {0: 50, 1: 30, 2: 20}
    assert stratified_split(labels, seed=7) == split
    assert stratified_split(labels, seed=8) != split


def test_topic_corpus_has_five_topics_with_sport_renamed():
    from training.data.topic import LABELS, load_topic

    data = load_topic()
    assert len(data) == 2225 and LABELS == ["business", "entertainment", "politics", "sport", "tech"]
    assert collections.Counter(data.labels) == {0: 510, 1: 386, 2: 417, 3: 511, 4: 401}
    assert not any("Â£" in text for text in data.texts)
