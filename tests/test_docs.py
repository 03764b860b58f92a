"""The documentation stays true to the code: every command in the README's and docs/' code blocks
parses with its script's own argument parser (a dry run: nothing is read or trained), every flag
named anywhere in them exists, docs/training.md states train.py's defaults, and every relative link
and anchor resolves. In-process parsers, no subprocess per command: the test takes seconds."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import math
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from tests.helpers import load_script

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PAGES = [README] + sorted((REPO / "docs").glob("*.md"))
# Flags of programs that are not ours, named in code blocks or prose.
EXTERNAL_FLAGS = {"--logdir"}
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def code_blocks(text: str, lang: str = "bash") -> list[str]:
    return [body for tag, body in FENCE.findall(text) if tag == lang]


def prose(text: str) -> str:
    """The page without its fenced blocks."""
    return FENCE.sub("", text)


def commands(block: str) -> list[list[str]]:
    """Each simple command of a shell block as its words: continuation lines joined, comments
    dropped, `&&`, `;` and `|` separating commands."""
    joined = re.sub(r"\\\n\s*", " ", block)
    found = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for token in lexer:
            if token and set(token) <= set(";&|"):
                found.append(words)
                words = []
            else:
                words.append(token)
        found.append(words)
    return [w for w in found if w]


def script_of(words: list[str]) -> Path | None:
    """The repository script a `python X.py ...` command runs, else None (pip, pytest, tensorboard)."""
    if len(words) >= 2 and words[0] in ("python", "python3") and words[1].endswith(".py"):
        path = REPO / words[1]
        assert path.is_file(), f"{' '.join(words)}: no script {words[1]} in the repository"
        return path
    return None


@cache
def parser_of(path: Path) -> argparse.ArgumentParser:
    if path.parent == REPO:
        module = importlib.import_module(path.stem)
    else:
        module = load_script(path, f"_docs_{path.stem}")
    assert hasattr(module, "get_args_parser"), f"{path.name}: has no get_args_parser() to check its commands with"
    return module.get_args_parser()


def dry_run(path: Path, argv: list[str]) -> str | None:
    """None when the parser accepts argv, else what it said."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser_of(path).parse_args(argv)
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1]
    return None


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= option_strings(sub)
    return found


@cache
def all_flags() -> set[str]:
    """Every flag of every command the documentation may name."""
    scripts = [p for p in REPO.glob("*.py")] + [p for p in (REPO / "benchmarks").glob("*.py")]
    found = set(EXTERNAL_FLAGS)
    for path in scripts:
        if "def get_args_parser" in path.read_text():
            found |= option_strings(parser_of(path))
    return found


def page_commands():
    for page in PAGES:
        for block in code_blocks(page.read_text()):
            for words in commands(block):
                if script_of(words) is not None:
                    yield pytest.param(page, words, id=f"{page.name}: {' '.join(words)[:70]}")


@pytest.mark.parametrize("page, words", list(page_commands()))
def test_each_command_parses_with_its_scripts_parser(page, words):
    problem = dry_run(script_of(words), words[2:])
    assert problem is None, f"{page.name}: `{' '.join(words)}`: {problem}"


def test_the_readme_names_its_commands_and_the_ci_runs_its_test_command():
    blocks = code_blocks(README.read_text())
    demo = ("python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && "
            "python train.py --task segmentation --demo && python train.py --task classification --demo")
    tests = "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && python -m pytest -q"
    assert blocks[0].strip() == demo and blocks[1].strip() == tests
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()
    ran = {Path(w[1]).name for b in blocks for w in commands(b) if script_of(w)}
    assert {"train.py", "predict_segmentation.py", "predict_classification.py", "evaluate.py", "report.py"} <= ran


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_flag_the_page_names_exists(page):
    unknown = sorted(set(FLAG.findall(page.read_text())) - all_flags())
    assert not unknown, f"{page.name} names flags no parser has: {unknown}"


def test_training_page_names_only_train_flags_in_its_prose():
    text = prose((REPO / "docs" / "training.md").read_text())
    unknown = sorted(set(FLAG.findall(text)) - option_strings(parser_of(REPO / "train.py")))
    assert not unknown, f"docs/training.md names flags train.py does not have: {unknown}"


# --------------------------------------------------------------------------------------------
# docs/training.md's flag table against train.py's defaults
# --------------------------------------------------------------------------------------------

NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])")
WORD = {True: "on", False: "off"}


def flag_rows() -> dict[str, str]:
    """{first flag of a row: its default cell} of the page's flag table."""
    text = (REPO / "docs" / "training.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`--"):
            rows[FLAG.findall(cells[0])[0]] = cells[1]
    return rows


def resolved_defaults(action: argparse.Action) -> list:
    """The values a flag takes when not given: for both tasks, with and without --demo."""
    import train
    parser = parser_of(REPO / "train.py")
    values = []
    for task in ("classification", "segmentation"):
        for demo in ([], ["--demo"]) if action.dest != "demo" else ([],):
            args = train.resolve_args(parser.parse_args(["--task", task, *demo]))
            value = getattr(args, action.dest)
            values.append(str(value).replace(task, "<task>") if isinstance(value, Path) else value)
    return values


def flatten(values) -> list:
    out = []
    for v in values:
        out += flatten(v) if isinstance(v, (list, tuple)) else [v]
    return out


def test_training_page_lists_every_flag_of_train_py_with_its_default():
    parser = parser_of(REPO / "train.py")
    rows = flag_rows()
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    missing = [a.option_strings[0] for a in actions if a.option_strings[0] not in rows]
    assert not missing, f"docs/training.md's flag table lacks {missing}"
    for action in actions:
        flag = action.option_strings[0]
        cell = rows[flag]
        if action.required:
            assert cell == "required", flag
            continue
        if flag == "--precision":  # depends on the machine: the cell names both outcomes
            assert "bf16-mixed" in cell and "32" in cell, cell
            continue
        values = flatten(resolved_defaults(action))
        numeric_cell = cell
        for v in values:  # a default written as text (a duration) is matched whole below, not as numbers
            if isinstance(v, str):
                numeric_cell = numeric_cell.replace(v, "")
        stated = [float(n) for n in NUMBER.findall(numeric_cell)]
        numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for v in values:
            if isinstance(v, bool):
                assert re.search(rf"\b{WORD[v]}\b", cell), f"{flag}: default {WORD[v]}, the page says {cell!r}"
            elif v is None:
                assert re.search(r"\bnone\b", cell), f"{flag}: no default, the page says {cell!r}"
            elif isinstance(v, str):
                assert v in cell, f"{flag}: default {v!r}, the page says {cell!r}"
            else:
                assert any(math.isclose(v, s) for s in stated), f"{flag}: default {v}, the page says {cell!r}"
        # and no stale number: each number the cell states is one of the defaults
        for s in stated:
            assert any(math.isclose(s, v) for v in numbers), f"{flag}: the page states {s}, defaults are {values}"


# --------------------------------------------------------------------------------------------
# Links
# --------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -N for repeats."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(page.read_text()), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


@pytest.mark.parametrize("page", PAGES + [REPO / "BENCHMARKS.md"], ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page):
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            assert anchor in anchors(file), f"{page.name}: link to {target}: no such heading in {file.name}"


def test_readme_is_a_front_door():
    words = len(README.read_text().split())  # what `wc -w` counts
    assert words <= 1800, f"README.md has {words} words; the manual belongs in docs/"
    linked = set(LINK.findall(README.read_text()))
    for page in sorted((REPO / "docs").glob("*.md")):
        assert any(t.split("#")[0] == f"docs/{page.name}" for t in linked), f"README.md does not link docs/{page.name}"
    assert "../shared" not in "".join(p.read_text() for p in PAGES + [REPO / "BENCHMARKS.md"])


# --------------------------------------------------------------------------------------------
# The other commands' flag tables: each flag of the command listed, and only its own
# --------------------------------------------------------------------------------------------

FLAG_TABLES = [("prediction.md", "## Segmentation", "predict_segmentation.py"),
               ("prediction.md", "## Classification", "predict_classification.py"),
               ("metrics.md", "## Files and flags", "evaluate.py"),
               ("report.md", "## Flags", "report.py")]


def table_flags(page: str, heading: str) -> set[str]:
    """The flags named in the first cells of the table rows of one section."""
    text = prose((REPO / "docs" / page).read_text())
    section = text.split(heading + "\n", 1)[1].split("\n## ", 1)[0]
    return {f for line in section.splitlines() if line.startswith("| `--")
            for f in FLAG.findall(line.split("|")[1])}


@pytest.mark.parametrize("page, heading, script", FLAG_TABLES, ids=[f"{p} {s}" for p, _, s in FLAG_TABLES])
def test_each_command_page_lists_exactly_its_scripts_flags(page, heading, script):
    stated = table_flags(page, heading)
    parser = parser_of(REPO / script)
    own = {a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}
    own_all = option_strings(parser)
    assert not stated - own_all, f"docs/{page} lists flags {script} does not have: {sorted(stated - own_all)}"
    assert not own - stated, f"docs/{page} lacks {script}'s flags {sorted(own - stated)}"
