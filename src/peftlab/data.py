"""Data: built-in datasets and local files → cleaned text/label frames, a label map, stratified splits.

Frames have two columns, ``text`` and ``label`` (the label *name*); ids come from the LabelMap so that
the mapping saved with a run is the single source of truth for every later stage.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from .config import DATA_DIR_ENV, DataConfig, data_dir, hub_offline
from .errors import DataError, did_you_mean, plural
from .labels import LabelMap

log = logging.getLogger("peftlab")

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
class Splits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    labels: LabelMap
    name: str
    notes: list[str] = field(default_factory=list)
    files: dict[str, dict] = field(default_factory=dict)  # what was read: role → path, size, SHA-256
    # Out-of-scope texts of validation and test (data.oos_label, data.known_intents): text + original label.
    # They are in neither ``validation`` nor ``test``, which hold in-scope texts only.
    oos: dict[str, pd.DataFrame] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        out = {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}
        out.update({f"{split}_out_of_scope": len(frame) for split, frame in self.oos.items()})
        return out

    def label_counts(self) -> dict[str, dict[str, int]]:
        """Examples per label name in each split (the report plots test F1 against training examples)."""
        out = {}
        for split, frame in (("train", self.train), ("validation", self.validation), ("test", self.test)):
            counts = frame.label.astype(str).value_counts()
            out[split] = {name: int(counts.get(name, 0)) for name in self.labels.names}
        return out


def columns(cfg: DataConfig) -> tuple[list[str], str]:
    """(text columns, label column) of the configured data: the keys if set, else the built-in dataset's
    own, else ['text'] and 'label' — the one place these defaults live."""
    spec = BUILTINS.get(cfg.dataset or "", {})
    return (list(cfg.text_columns or spec.get("text_columns", ["text"])),
            cfg.label_column or spec.get("label_column", "label"))


def file_record(path: Path) -> dict:
    """What identifies a data file's content: absolute path, size in bytes and SHA-256."""
    p = Path(path).resolve()
    return {"path": str(p), "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}


def changed_files(recorded: dict[str, dict]) -> list[str]:
    """One line per recorded data file that is gone or no longer has the recorded content."""
    out = []
    for role, rec in recorded.items():
        p = Path(rec["path"])
        if not p.is_file():
            out.append(f"{role} file '{p}' is gone")
        elif file_record(p)["sha256"] != rec["sha256"]:
            out.append(f"{role} file '{p}' changed since training ({rec['bytes']:,} bytes then, "
                       f"{p.stat().st_size:,} now; SHA-256 differs)")
    return out


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
    size = int(n) if n >= 1 else n
    if (size if isinstance(size, int) else round(size * len(df))) >= len(df):
        what = f"{size:,} examples" if isinstance(size, int) else f"{size:g} of the examples"
        raise DataError(f"cannot take {what} out of {len(df):,}: lower data.validation_size or the subset size")
    counts = df["label"].value_counts()
    stratify = df["label"] if counts.min() >= 2 else None
    try:
        rest, taken = train_test_split(df, test_size=size, random_state=seed, stratify=stratify)
    except ValueError:  # fewer examples than classes in the requested split: fall back to random
        rest, taken = train_test_split(df, test_size=size, random_state=seed)
    return rest.reset_index(drop=True), taken.reset_index(drop=True)


def _load_builtin(cfg: DataConfig) -> tuple[dict[str, pd.DataFrame], list[str] | None, list[str], dict[str, dict]]:
    spec = BUILTINS[cfg.dataset]
    text_cols, label_col = columns(cfg)
    root = data_dir(cfg)
    notes: list[str] = []
    folder = root / cfg.dataset if root else None
    if folder is not None and (folder / spec["test"]).is_file():
        frames, files = {}, {}
        for split in ("train", "test"):
            f = folder / spec[split]
            if f.is_file():
                frames[split] = to_frame(read_table(f), text_cols, label_col, str(f), spec.get("clean", False))
                files[split] = file_record(f)
        names = spec.get("labels")
        if spec.get("labels_file") and (folder / spec["labels_file"]).is_file():
            names = json.loads((folder / spec["labels_file"]).read_text())
            files["labels"] = file_record(folder / spec["labels_file"])
        if "train" not in frames:
            if cfg.dataset != "ag_news":
                raise DataError(f"{folder / spec['train']} not found")
            # The offline AG News variant: cut train from the official test split.
            rest, test = stratified_take(frames["test"], AG_NEWS_OFFLINE_TEST_FRACTION, seed=0)
            frames = {"train": rest, "test": test}
            notes.append(AG_NEWS_OFFLINE_NOTE)
        return frames, names, notes, files
    if not hub_offline():
        return _load_from_hub(spec, cfg.dataset), None, notes, {}
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


def read_labelled(path: str | Path, cfg: DataConfig, require_labels: bool = True) -> pd.DataFrame:
    """A text/label frame from one file with the run's columns (``peftlab evaluate --data``, export's
    parity texts); without ``require_labels`` a file lacking the label column gives texts only."""
    table = read_table(path)
    text_cols, label_col = columns(cfg)
    has_labels = require_labels or label_col in table.columns
    return to_frame(table, text_cols, label_col if has_labels else None, str(path))


def load(cfg: DataConfig, seed: int) -> Splits:
    """Load, clean and split the configured data; raise DataError naming any problem."""
    notes: list[str] = []
    names: list[str] | None = None
    text_cols, label_col = columns(cfg)
    if cfg.dataset is not None:
        if cfg.dataset not in BUILTINS:
            raise DataError(f"unknown dataset {cfg.dataset!r}{did_you_mean(cfg.dataset, BUILTINS)} (built-in: "
                            f"{', '.join(BUILTINS)}; or give data.train_file)")
        frames, names, notes, files = _load_builtin(cfg)
        name = cfg.dataset + ("-offline" if notes else "")
    else:
        frames = {"train": to_frame(read_table(cfg.train_file), text_cols, label_col, cfg.train_file),
                  "test": to_frame(read_table(cfg.test_file), text_cols, label_col, cfg.test_file)}
        files = {"train": file_record(cfg.train_file), "test": file_record(cfg.test_file)}
        name = Path(cfg.train_file).stem
    if cfg.validation_file:
        frames["validation"] = to_frame(read_table(cfg.validation_file), text_cols, label_col, cfg.validation_file)
        files["validation"] = file_record(cfg.validation_file)
    train, test = frames["train"], frames["test"]
    oos_names = set()
    if cfg.oos_label is not None:
        oos_names = {cfg.oos_label}
        everywhere = set(train["label"]) | set(test["label"]) | set(frames.get("validation", train)["label"])
        if cfg.oos_label not in everywhere:
            raise DataError(f"data.oos_label {cfg.oos_label!r} occurs in no split"
                            f"{did_you_mean(cfg.oos_label, sorted(everywhere))}; name the label that marks "
                            "out-of-scope examples, or remove the key")
        if cfg.oos_train == "class" and cfg.oos_label not in set(train["label"]):
            raise DataError(f"data.oos_train class: the training data has no {cfg.oos_label!r} examples to train "
                            "the class on; use data.oos_train threshold")
    elif cfg.known_intents is not None:
        oos_names = _held_out_intents(sorted(set(train["label"])), cfg.known_intents, seed)
    if oos_names:  # test labels of held-out intents are out of scope, not unseen
        test, test_oos = test[~test["label"].isin(oos_names)], test[test["label"].isin(oos_names)]
    seen = set(train["label"])
    unseen = sorted(set(test["label"]) - seen)
    if unseen:
        raise DataError(f"test labels not in the training data: {', '.join(unseen[:5])}"
                        f"{' …' if len(unseen) > 5 else ''} ({plural(len(unseen), 'label')}); fix the label column "
                        "or the files")
    if train["label"].nunique() < 2:
        raise DataError(f"the training data has one label ({train['label'].iloc[0]!r}); classification needs at "
                        "least 2 — check data.label_column")
    if names is None or set(names) != seen:
        names = sorted(seen)
    if oos_names and not (cfg.oos_label is not None and cfg.oos_train == "class"):
        names = [n for n in names if n not in oos_names]
    if cfg.max_train_examples and cfg.max_train_examples < len(train):
        _, train = stratified_take(train, cfg.max_train_examples, seed)
    if cfg.max_test_examples and cfg.max_test_examples < len(test):
        _, test = stratified_take(test, cfg.max_test_examples, seed)
    if "validation" in frames:
        validation = frames["validation"]
    else:
        train, validation = stratified_take(train, cfg.validation_size, seed)
    oos = {}
    if oos_names:
        train = train[train["label"].isin(names)].reset_index(drop=True)
        oos = {"validation": validation[validation["label"].isin(oos_names)].reset_index(drop=True),
               "test": test_oos.reset_index(drop=True)}
        validation = validation[~validation["label"].isin(oos_names)].reset_index(drop=True)
        test = test.reset_index(drop=True)
    labels = LabelMap(list(names))
    extra = sorted(set(validation["label"]) - set(labels.names))
    if extra:
        raise DataError(f"validation labels not in the training data: {', '.join(extra[:5])}")
    return Splits(train, validation, test, labels, name, notes, files, oos)


def _held_out_intents(names: list[str], fraction: float, seed: int) -> set[str]:
    """The intents that ``data.known_intents`` leaves out: all but a seeded random ``fraction`` of them."""
    keep = round(fraction * len(names))
    if keep < 2:
        raise DataError(f"data.known_intents {fraction:g} keeps {keep} of {len(names)} intents; classification "
                        f"needs at least 2: raise it to {2 / len(names):.2f} or more")
    if keep >= len(names):
        raise DataError(f"data.known_intents {fraction:g} keeps all {len(names)} intents, so none is out of scope: "
                        f"lower it below {(len(names) - 0.5) / len(names):.2f}")
    order = np.random.RandomState(seed).permutation(len(names))
    return {names[i] for i in order[keep:]}
