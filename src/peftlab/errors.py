"""Errors a user can fix. The CLI prints them as one line, ``error: …``, and exits with code 2."""


class PeftlabError(Exception):
    """Base class: a problem in the user's input, never a bug in peftlab."""


class ConfigError(PeftlabError):
    """A config key is unknown, has the wrong type, or conflicts with another."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} config problems: " + "; ".join(self.problems)
        super().__init__(msg)


class DataError(PeftlabError):
    """A data file or column is missing, empty or inconsistent."""


class RunError(PeftlabError):
    """A run folder is missing, incomplete or not a peftlab run."""


class ExportError(PeftlabError):
    """An export cannot be made, or does not reproduce the run's predictions."""
