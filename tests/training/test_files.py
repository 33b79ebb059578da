"""Loaders for users' own data, on small files written by the tests."""

from __future__ import annotations

import json

import pytest

from training.data import predefined_split
from training.data.files import DataFormatError, load_aclimdb, load_table


def test_csv_with_custom_columns_and_label_order(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text('id,review,stars\n1,"Great, loved it",good\n2,awful,bad\n3,,bad\n4,fine again,good\n')
    data = load_table(path, text_column="review", label_column="stars", label_names=["bad", "good"])
    assert data.texts == ["Great, loved it", "awful", "fine again"]  # the empty review is skipped
    assert data.labels == [1, 0, 1] and data.label_names == ["bad", "good"]


def test_tsv_and_jsonl(tmp_path):
    (tmp_path / "a.tsv").write_text("text\tlabel\nhello there\tgreeting\nbye now\tfarewell\n")
    assert load_table(tmp_path / "a.tsv").label_names == ["farewell", "greeting"]
    lines = [{"text": "one", "label": "x"}, {"text": "two", "label": "y"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    data = load_table(tmp_path / "a.jsonl")
    assert data.texts == ["one", "two"] and data.labels == [0, 1]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", "text,other\nhello,x\n", "missing.csv:2: missing column 'label'"),
        ("bad.jsonl", '{"text": "a", "label": "x"}\n{not json\n', "bad.jsonl:2: not valid JSON"),
        ("one.csv", "text,label\na,x\nb,x\n", "needs at least 2 distinct labels"),
        ("data.xml", "<x/>", "unknown format '.xml'"),
    ],
)
def test_bad_files_name_the_file_and_row(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataFormatError, match=message.replace("(", r"\(").replace("{", r"\{")):
        load_table(tmp_path / name)


def test_unknown_label_against_a_given_order(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\na,x\nb,z\n")
    with pytest.raises(DataFormatError, match=r"labels \['z'\] are not among"):
        load_table(tmp_path / "a.csv", label_names=["x", "y"])


def test_aclimdb_layout_keeps_its_test_split(tmp_path):
    root = tmp_path / "aclImdb"
    for part in ("train", "test"):
        for label in ("neg", "pos"):
            folder = root / part / label
            folder.mkdir(parents=True)
            for i in range(10):
                (folder / f"{i}_7.txt").write_text(f"{part} {label} review {i}<br />second line")
    data = load_aclimdb(root)
    assert len(data) == 40 and data.label_names == ["neg", "pos"]
    assert "<br />" not in data.texts[0]
    split = predefined_split(data.parts)
    assert len(split.test) == 20 and all(data.texts[i].startswith("test ") for i in split.test)
    assert len(split.validation) == 2 and len(split.train) == 18
    assert sorted(data.labels[i] for i in split.validation) == [0, 1]


def test_aclimdb_missing_folder_is_explained(tmp_path):
    (tmp_path / "aclImdb" / "train" / "neg").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="no reviews"):
        load_aclimdb(tmp_path / "aclImdb")
