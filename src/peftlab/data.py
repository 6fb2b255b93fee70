"""Data: built-in datasets and local files → cleaned text/label frames, a label map, stratified splits.

Frames have two columns, ``text`` and ``label`` (the label *name*); ids come from the LabelMap so that
the mapping saved with a run is the single source of truth for every later stage.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .config import DataConfig
from .errors import DataError

log = logging.getLogger("peftlab")

DATA_DIR_ENV = "PEFTLAB_DATA_DIR"

# Built-in datasets: where their files sit under a data directory, their columns, and the hub copy
# used when no local copy exists and the hub is reachable.
BUILTINS = {
    "banking77": {
        "train": "train.csv", "test": "test.csv", "text_columns": ["text"], "label_column": "category",
        "labels_file": "categories.json", "hub_id": "PolyAI/banking77", "hub_label": "label",
    },
    "ag_news": {
        "train": "train.csv", "test": "test.csv", "text_columns": ["title", "description"],
        "label_column": "label", "labels": ["World", "Sports", "Business", "Sci/Tech"],
        "hub_id": "fancyzhx/ag_news", "hub_label": "label", "clean": True,
    },
}

# AG News offline: only the 7,600-row test split ships, so a smaller benchmark is cut from it.
AG_NEWS_OFFLINE_TEST_FRACTION = 0.2
AG_NEWS_OFFLINE_NOTE = ("ag_news offline variant: train/validation/test cut (stratified) from the 7,600-row "
                        "official test split; not comparable with published AG News figures")


@dataclass
class LabelMap:
    names: list[str]

    def __post_init__(self):
        self.ids = {name: i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    def encode(self, labels) -> list[int]:
        return [self.ids[str(x)] for x in labels]

    def save(self, path: Path) -> None:
        from .runs import write_json  # local import keeps this module free of run-folder concerns

        write_json(path, {"id2label": {str(i): n for i, n in enumerate(self.names)}})

    @classmethod
    def load(cls, path: Path) -> LabelMap:
        raw = json.loads(Path(path).read_text())["id2label"]
        return cls([raw[str(i)] for i in range(len(raw))])


@dataclass
class Splits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    labels: LabelMap
    name: str
    notes: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


# ------------------------------------------------------------------------------------------ reading

def read_table(path: str | Path) -> pd.DataFrame:
    """Read CSV/TSV, JSONL/JSON or Parquet into a frame, with one-line errors for the usual mistakes."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file '{p}' not found")
    if p.stat().st_size == 0:
        raise DataError(f"data file '{p}' is empty")
    suffix = p.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            df = pd.read_csv(p, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                             encoding="utf-8")
        elif suffix in (".jsonl", ".json"):
            df = pd.read_json(p, lines=suffix == ".jsonl", dtype=False)
        elif suffix == ".parquet":
            try:
                df = pd.read_parquet(p)
            except ImportError:
                raise DataError("reading Parquet needs pyarrow: pip install 'peftlab[parquet]'") from None
        else:
            raise DataError(f"data file '{p}': unsupported format '{suffix}' (use .csv, .tsv, .jsonl, .json or .parquet)")
    except UnicodeDecodeError as e:
        raise DataError(f"data file '{p}' is not UTF-8 ({e.reason} at byte {e.start}): re-save it as UTF-8") from None
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError(f"data file '{p}' could not be parsed: {str(e).splitlines()[0]}") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"data file '{p}' is empty") from None
    if len(df) == 0:
        raise DataError(f"data file '{p}' has a header but no rows")
    dupes = [c for c in df.columns if re.fullmatch(r".+\.\d+", str(c)) and str(c).rsplit(".", 1)[0] in df.columns]
    if dupes:
        raise DataError(f"data file '{p}' has a duplicate column header: {dupes[0].rsplit('.', 1)[0]!r}")
    return df


_ENTITY = re.compile(r"(?<![&\w])#(\d+);")
_NAMED = re.compile(r"(?<![&\w])(quot|amp|lt|gt|nbsp);")
_TAG = re.compile(r"<[^>]{1,40}>")


def clean_text(text: str) -> str:
    """Undo AG News' escapes: '\\' stands for a newline and entities lost their '&' ('#39;' → "'")."""
    text = text.replace("\\", " ")
    text = re.sub(r" ?#39;(?=[a-z])", "'", text)  # "Wall Street #39;s" was "Wall Street's"
    text = _ENTITY.sub(r"&#\1;", text)
    text = _NAMED.sub(r"&\1;", text)
    text = _TAG.sub(" ", html.unescape(text))
    return " ".join(text.split())


# A text this long is a broken file (an unclosed quote), not a sentence: models read the first
# max_length_tokens tokens of it anyway.
MAX_TEXT_CHARS = 100_000


def to_frame(df: pd.DataFrame, text_columns: list[str], label_column: str | None, source: str,
             clean: bool = False) -> pd.DataFrame:
    """Select and join the text column(s) and the label column into a text/label frame."""
    wanted = list(text_columns) + ([label_column] if label_column else [])
    missing = [c for c in wanted if c not in df.columns]
    if missing:
        raise DataError(f"{source}: column {missing[0]!r} not found (columns: {', '.join(map(str, df.columns))}); "
                        "set data.text_columns / data.label_column")
    parts = [df[c].fillna("").astype(str).str.strip() for c in text_columns]
    text = parts[0]
    for extra in parts[1:]:
        text = text.str.cat(extra, sep=". ").str.strip(". ").str.strip()
    if clean:
        text = text.map(clean_text)
    lengths = text.str.len()
    if len(text) and lengths.max() > MAX_TEXT_CHARS:
        row = int(lengths.to_numpy().argmax())
        raise DataError(f"{source}: data row {row + 1} has a text of {int(lengths.iloc[row]):,} characters (the limit "
                        f"is {MAX_TEXT_CHARS:,}); in a CSV an unclosed quote swallows the rows after it — fix that row")
    out = pd.DataFrame({"text": text})
    if label_column:
        labels = df[label_column]
        if labels.isna().any() or (labels.astype(str).str.strip() == "").any():
            raise DataError(f"{source}: {int((labels.isna() | (labels.astype(str).str.strip() == '')).sum())} rows have "
                            f"no label in column {label_column!r}")
        kinds = {type(x).__name__ for x in labels}
        if len(kinds) > 1:
            raise DataError(f"{source}: column {label_column!r} mixes label types ({', '.join(sorted(kinds))}); "
                            "use one type for every label")
        out["label"] = labels.astype(str).str.strip()
    empty = out["text"].str.len() == 0
    if empty.any():
        log.warning("%s: dropped %d rows with empty text", source, int(empty.sum()))
        out = out[~empty]
    if len(out) == 0:
        raise DataError(f"{source}: no rows with text in column(s) {', '.join(text_columns)}")
    return out.reset_index(drop=True)


# ------------------------------------------------------------------------------------------ splits

def stratified_take(df: pd.DataFrame, n: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``df`` into (rest, taken) with ``n`` rows (or that fraction) taken, stratified by label."""
    from sklearn.model_selection import train_test_split

    size = int(n) if n >= 1 else n
    if (size if isinstance(size, int) else round(size * len(df))) >= len(df):
        raise DataError(f"cannot take {n} examples out of {len(df)}: lower data.validation_size or the subset size")
    counts = df["label"].value_counts()
    stratify = df["label"] if counts.min() >= 2 else None
    try:
        rest, taken = train_test_split(df, test_size=size, random_state=seed, stratify=stratify)
    except ValueError:  # fewer examples than classes in the requested split: fall back to random
        rest, taken = train_test_split(df, test_size=size, random_state=seed)
    return rest.reset_index(drop=True), taken.reset_index(drop=True)


def data_dir(cfg: DataConfig) -> Path | None:
    d = cfg.data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(d).expanduser() if d else None


def _hub_reachable() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False")


def _load_builtin(cfg: DataConfig) -> tuple[dict[str, pd.DataFrame], list[str] | None, list[str]]:
    spec = BUILTINS[cfg.dataset]
    text_cols = cfg.text_columns or spec["text_columns"]
    label_col = cfg.label_column or spec["label_column"]
    root = data_dir(cfg)
    notes: list[str] = []
    folder = root / cfg.dataset if root else None
    if folder is not None and (folder / spec["test"]).is_file():
        frames = {}
        for split in ("train", "test"):
            f = folder / spec[split]
            if f.is_file():
                frames[split] = to_frame(read_table(f), text_cols, label_col, str(f), spec.get("clean", False))
        names = spec.get("labels")
        if spec.get("labels_file") and (folder / spec["labels_file"]).is_file():
            names = json.loads((folder / spec["labels_file"]).read_text())
        if "train" not in frames:
            if cfg.dataset != "ag_news":
                raise DataError(f"{folder / spec['train']} not found")
            # The offline AG News variant: cut train from the official test split.
            rest, test = stratified_take(frames["test"], AG_NEWS_OFFLINE_TEST_FRACTION, seed=0)
            frames = {"train": rest, "test": test}
            notes.append(AG_NEWS_OFFLINE_NOTE)
        return frames, names, notes
    if _hub_reachable():
        return _load_from_hub(spec, cfg.dataset), None, notes
    where = f"under '{root}'" if root else "(no data directory given)"
    raise DataError(f"dataset {cfg.dataset!r} not found {where}: pass --data-dir DIR (holding {cfg.dataset}/"
                    f"{spec['test']}) or set ${DATA_DIR_ENV}; the hub is offline")


def _load_from_hub(spec: dict, name: str) -> dict[str, pd.DataFrame]:  # pragma: no cover - needs the hub
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset {name!r} has no local copy; to fetch it from the hub: pip install 'peftlab[hub]'") from None
    ds = datasets.load_dataset(spec["hub_id"])
    names = ds["train"].features[spec["hub_label"]].names
    frames = {}
    for split in ("train", "test"):
        df = ds[split].to_pandas()
        df[spec["hub_label"]] = [names[i] for i in df[spec["hub_label"]]]
        cols = [c for c in spec["text_columns"] if c in df.columns] or ["text"]
        frames[split] = to_frame(df, cols, spec["hub_label"], f"{spec['hub_id']}:{split}", spec.get("clean", False))
    return frames


def load(cfg: DataConfig, seed: int) -> Splits:
    """Load, clean and split the configured data; raise DataError naming any problem."""
    notes: list[str] = []
    names: list[str] | None = None
    if cfg.dataset is not None:
        if cfg.dataset not in BUILTINS:
            import difflib

            close = difflib.get_close_matches(cfg.dataset, BUILTINS, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            raise DataError(f"unknown dataset {cfg.dataset!r}{hint} (built-in: {', '.join(BUILTINS)}; "
                            "or give data.train_file)")
        frames, names, notes = _load_builtin(cfg)
        name = cfg.dataset + ("-offline" if notes else "")
    else:
        text_cols, label_col = cfg.text_columns or ["text"], cfg.label_column or "label"
        frames = {"train": to_frame(read_table(cfg.train_file), text_cols, label_col, cfg.train_file),
                  "test": to_frame(read_table(cfg.test_file), text_cols, label_col, cfg.test_file)}
        name = Path(cfg.train_file).stem
    if cfg.validation_file:
        text_cols = cfg.text_columns or ["text"]
        frames["validation"] = to_frame(read_table(cfg.validation_file), text_cols, cfg.label_column or "label",
                                        cfg.validation_file)
    train, test = frames["train"], frames["test"]
    seen = set(train["label"])
    unseen = sorted(set(test["label"]) - seen)
    if unseen:
        raise DataError(f"test labels not in the training data: {', '.join(unseen[:5])}"
                        f"{' …' if len(unseen) > 5 else ''} ({len(unseen)} label{'s' if len(unseen) > 1 else ''}); fix the label column or the files")
    if train["label"].nunique() < 2:
        raise DataError(f"the training data has one label ({train['label'].iloc[0]!r}); classification needs at "
                        "least 2 — check data.label_column")
    if names is None or set(names) != seen:
        names = sorted(seen)
    if cfg.max_train_examples and cfg.max_train_examples < len(train):
        _, train = stratified_take(train, cfg.max_train_examples, seed)
    if cfg.max_test_examples and cfg.max_test_examples < len(test):
        _, test = stratified_take(test, cfg.max_test_examples, seed)
    if "validation" in frames:
        validation = frames["validation"]
    else:
        train, validation = stratified_take(train, cfg.validation_size, seed)
    labels = LabelMap(list(names))
    for split_name, df in (("validation", validation),):
        extra = sorted(set(df["label"]) - set(labels.names))
        if extra:
            raise DataError(f"{split_name} labels not in the training data: {', '.join(extra[:5])}")
    return Splits(train, validation, test, labels, name, notes)
