"""TF-IDF + logistic regression on the same split: the bar every text model must clear."""

from __future__ import annotations

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from serving.card import EvaluationMetrics
from training.data import TextDataset
from training.metrics import evaluation_metrics

BASELINE_METHOD = "TF-IDF (word 1-2 grams, sublinear tf, min_df 2) + logistic regression (C=4)"


def tfidf_baseline(train: TextDataset, test: TextDataset, seed: int) -> EvaluationMetrics:
    pipeline = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        LogisticRegression(C=4.0, max_iter=2000, random_state=seed),
    )
    pipeline.fit(train.texts, train.labels)
    return evaluation_metrics("test", test.labels, pipeline.predict(test.texts), test.label_names)
