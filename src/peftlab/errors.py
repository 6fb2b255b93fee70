"""Errors a user can fix. The CLI prints them after ``error: `` and exits with code 2; HTTP answers 4xx.

A ConfigError holds one problem per line: a single problem is one line; several come under a heading
(``5 problems in bad.yaml:``), each on its own line, followed by notes said once for all of them
(the allowed keys of a section, say).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# How alike a mistyped name must be to a real one before "did you mean" names it (difflib's ratio on
# the key's own name, without its section). Measured on real slips and on the keys users paste from
# other tools (tests/test_config.py): slips such as 'warmup' → 'warmup_ratio' score 0.67 and more;
# unrelated keys pasted from a notebook's AdaLoRA block (the write-up "AdaLoRA Fine-Tuning Results for
# Intent Classification") score at most 0.57
# ('min_rank' ~ 'init_r'), so 0.65 names the first and stays quiet on the second.
SUGGESTION_CUTOFF = 0.65


def did_you_mean(word: object, options: Iterable[object], prefix: str = "") -> str:
    """`` — did you mean 'prefix+option'?`` for the option closest to ``word``, or '' when none is close."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=SUGGESTION_CUTOFF)
    return f" — did you mean '{prefix}{close[0]}'?" if close else ""


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


class PeftlabError(Exception):
    """Base class: a problem in the user's input, never a bug in peftlab."""


class ConfigError(PeftlabError):
    """A config key is unknown, has the wrong type, or conflicts with another."""

    def __init__(self, problems: list[str] | str, source: str | None = None, notes: Iterable[str] = ()):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source, self.notes = source, list(dict.fromkeys(notes))
        super().__init__(self.format())

    def format(self) -> str:
        if len(self.problems) == 1:
            extra = f" ({'; '.join(self.notes)})" if self.notes else ""
            return self.problems[0] + extra
        heading = f"{len(self.problems)} problems in {self.source}:" if self.source else \
            f"{len(self.problems)} config problems:"
        return "\n".join([heading, *(f"  {p}" for p in self.problems),
                          *(f"  ({n})" for n in self.notes)])


class DataError(PeftlabError):
    """A data file or column is missing, empty or inconsistent."""


class RunError(PeftlabError):
    """A run folder is missing, incomplete or not a peftlab run."""


class ExportError(PeftlabError):
    """An export cannot be made, or does not reproduce the run's predictions."""
