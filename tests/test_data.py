"""Data loading: built-ins, local files, cleaning, splits, and one-line errors for bad data."""

import logging

import pandas as pd
import pytest

from peftlab import config
from peftlab import data as data_mod
from peftlab.errors import DataError


def load(**kw):
    cfg = config.load(overrides=[f"data.{k}={v}" for k, v in kw.items()])
    return data_mod.load(cfg.data, seed=0)


def test_banking77_builtin_has_77_labels_and_a_stratified_validation_split(data_dir):
    s = load(data_dir=data_dir, validation_size=640)
    assert s.sizes() == {"train": 10003 - 640, "validation": 640, "test": 3080}
    assert len(s.labels) == 77 and s.labels.names[0] == "card_arrival"  # categories.json order
    assert set(s.validation.label) == set(s.labels.names)  # stratified: every intent in validation


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("PEFTLAB_DATA_DIR", str(data_dir))
    assert load(max_test_examples=77).sizes()["test"] == 77


def test_missing_builtin_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTLAB_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"dataset 'banking77' not found under '.*': pass --data-dir DIR"):
        load(data_dir=tmp_path)
    with pytest.raises(DataError, match=r"unknown dataset 'banking' — did you mean 'banking77'\?"):
        load(dataset="banking")


def test_ag_news_offline_variant_is_cut_from_the_test_split_and_cleaned(data_dir):
    s = load(data_dir=data_dir, dataset="ag_news")
    assert s.name == "ag_news-offline" and "not comparable" in s.notes[0]
    assert sum(s.sizes().values()) == 7600
    assert s.labels.names == ["World", "Sports", "Business", "Sci/Tech"]
    text = " ".join(pd.concat([s.train.text, s.test.text]))
    for escape in ("#39;", "quot;", "\\", "#36;"):
        assert escape not in text
    assert data_mod.clean_text("A second\\team  #36;10 million, it #39;s &lt;b&gt;") == "A second team $10 million, it's"


def test_local_files_csv_jsonl_parquet_with_joined_text_columns(tmp_path):
    df = pd.DataFrame({"title": ["a", "b", "c", "d"] * 5, "body": ["x", "y", "z", "w"] * 5,
                       "y": ["p", "q"] * 10})
    df.to_csv(tmp_path / "t.csv", index=False)
    df.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    df.to_parquet(tmp_path / "t.parquet")
    for suffix in ("csv", "jsonl", "parquet"):
        s = load(train_file=tmp_path / f"t.{suffix}", test_file=tmp_path / "t.csv", text_columns="title,body",
                 label_column="y", validation_size=4)
        assert s.train.text.iloc[0].count(". ") == 1 and s.sizes() == {"train": 16, "validation": 4, "test": 20}


@pytest.mark.parametrize("content,message", [
    (None, r"data file '.*missing.csv' not found"),
    ("", r"data file '.*bad.csv' is empty"),
    ("text,label\n", r"data file '.*bad.csv' has a header but no rows"),
    ("txt,label\nhello,a\n", r"column 'text' not found \(columns: txt, label\)"),
    ("text,label,label\nhi,a,b\n", r"duplicate column header: 'label'"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    name = "missing.csv" if content is None else "bad.csv"
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        load(train_file=tmp_path / name, test_file=tmp_path / name)


def test_non_utf8_file(tmp_path):
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,a\n".encode("latin-1"))
    with pytest.raises(DataError, match="is not UTF-8"):
        data_mod.read_table(tmp_path / "latin.csv")


def test_test_labels_unseen_in_training(tmp_path):
    pd.DataFrame({"text": list("abcdefgh"), "label": ["x", "y"] * 4}).to_csv(tmp_path / "tr.csv", index=False)
    pd.DataFrame({"text": ["q", "r"], "label": ["x", "z"]}).to_csv(tmp_path / "te.csv", index=False)
    with pytest.raises(DataError, match=r"^test labels not in the training data: z \(1 label\)"):
        load(train_file=tmp_path / "tr.csv", test_file=tmp_path / "te.csv", validation_size=2)


def test_empty_texts_are_dropped_with_a_count(tmp_path, caplog):
    pd.DataFrame({"text": ["a", "", "b", "  ", "c", "d", "e", "f"], "label": ["x", "y"] * 4}).to_csv(
        tmp_path / "tr.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="peftlab"):
        s = load(train_file=tmp_path / "tr.csv", test_file=tmp_path / "tr.csv", validation_size=2)
    assert "dropped 2 rows with empty text" in caplog.text
    assert len(s.test) == 6


def test_mixed_label_types_are_refused(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "one"}\n')
    with pytest.raises(DataError, match="mixes label types"):
        load(train_file=tmp_path / "m.jsonl", test_file=tmp_path / "m.jsonl")


def test_column_defaults_come_from_one_place(tmp_path):
    assert data_mod.columns(config.load().data) == (["text"], "category")  # banking77's own
    assert data_mod.columns(config.load(overrides=["data.dataset=ag_news"]).data) == (["title", "description"], "label")
    files = config.load(overrides=["data.train_file=a.csv", "data.test_file=a.csv"]).data
    assert data_mod.columns(files) == (["text"], "label")
    assert data_mod.columns(config.load(overrides=["data.label_column=intent"]).data) == (["text"], "intent")


def test_a_count_that_does_not_fit_is_said_as_a_count(tmp_path):
    pd.DataFrame({"text": list("abcdefgh"), "label": ["x", "y"] * 4}).to_csv(tmp_path / "tr.csv", index=False)
    with pytest.raises(DataError, match=r"^cannot take 640 examples out of 8: lower data.validation_size"):
        load(train_file=tmp_path / "tr.csv", test_file=tmp_path / "tr.csv", validation_size=640)
