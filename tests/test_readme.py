"""The README's Quick start and Python API run as written, on the tiny model, so they cannot drift again.

Every ``bash`` and ``python`` block of those sections is run: shell lines command by command (``&&``), the
``peftlab`` commands through this interpreter with overrides that swap in the tiny model and a small slice
of Banking77 (so a block takes seconds, not the minutes it takes on the real model); the environment setup
(venv, activate, pip install) is checked against what CI installs rather than run. A ``text`` block right
after a command is its sample output: the command's output must have the same shape. Python blocks are
executed with ``peftlab.config.load`` appending the same overrides.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import DATA_DIR, REPO

import peftlab

SECTIONS = ("Quick start", "Python API")


def blocks(section: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block under ``## section``, in order."""
    text = (REPO / "README.md").read_text()
    body = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert body, f"README has no section '## {section}'"
    return re.findall(r"^```(\w*)\n(.*?)^```", body.group(1), re.S | re.M)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model):
    """A checkout-like folder: configs/ beside the code, ../shared/data beside the checkout."""
    root = tmp_path_factory.mktemp("readme")
    (root / "shared").mkdir()
    (root / "shared" / "data").symlink_to(DATA_DIR)
    (root / "repo").mkdir()
    (root / "repo" / "configs").symlink_to(REPO / "configs")
    return root / "repo"


def tiny(model: Path) -> list[str]:
    return [f"model.name={model}", "data.max_train_examples=300", "data.max_test_examples=154",
            "data.validation_size=30", "train.epochs=1", "train.num_threads=1"]


def shape(sample: str) -> re.Pattern:
    """A pattern for output like ``sample``: numbers and the run folder's time stamp may differ."""
    pattern = re.escape(sample.strip())
    pattern = re.sub(r"(\\-)?\d[\d,]*(\\\.\d+)?", r"-?[\\d,]+(\\.\\d+)?", pattern)
    return re.compile(pattern)


def check_setup(command: list[str]) -> None:
    """The environment setup lines: what CI does (a venv, then pip install of this project's extras)."""
    if command[:3] == ["python3", "-m", "venv"] or command[0] in (".", "source"):
        return
    assert command[:2] == ["pip", "install"], f"README command not runnable here: {shlex.join(command)}"
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for arg in command[2:]:
        m = re.fullmatch(r"""['"]?\.(\[([\w,]+)\])?['"]?""", arg)
        if m:
            assert set((m.group(2) or "").split(",")) - {""} <= extras, arg
        else:
            assert arg in ("-e", "torch==2.13.0"), f"unexpected pip argument {arg!r}"
    assert "torch==2.13.0" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_blocks_run_as_written(section, workdir, tiny_model, monkeypatch):
    found = blocks(section)
    assert any(lang in ("bash", "python") for lang, _ in found)
    monkeypatch.chdir(workdir)
    real_load = peftlab.config.load
    monkeypatch.setattr(peftlab.config, "load", lambda path=None, overrides=None: real_load(
        path, [*(overrides or []), *tiny(tiny_model)]))
    output = None
    for lang, code in found:
        if lang == "bash":
            for line in code.splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                for part in line.split("&&"):
                    command = shlex.split(part, comments=True)
                    if command[0] != "peftlab":
                        check_setup(command)
                        continue
                    extra = tiny(tiny_model) if command[1] == "train" else []
                    r = subprocess.run([sys.executable, "-m", "peftlab.cli", *command[1:], *extra], cwd=workdir,
                                       capture_output=True, text=True, timeout=600)
                    assert r.returncode == 0, f"{shlex.join(command)}\n{r.stderr[-3000:]}"
                    output = r.stdout
        elif lang == "python":
            namespace: dict = {}
            exec(compile(code, f"README.md ({section})", "exec"), namespace)
            assert (Path(namespace["run"]) / "summary.json").is_file()
        elif lang == "text" and output is not None:  # sample output of the command before it
            assert shape(code).fullmatch(output.strip()), f"README sample:\n{code}\nactual:\n{output}"
            output = None


def test_the_layout_section_lists_every_module_and_only_those():
    text = (REPO / "README.md").read_text()
    layout = re.search(r"^## Layout\n.*?```\n(.*?)```", text, re.S | re.M).group(1)
    listed = re.findall(r"^  (\w+\.py) ", layout, re.M)
    assert sorted(listed) == sorted(p.name for p in (REPO / "src" / "peftlab").glob("*.py"))
