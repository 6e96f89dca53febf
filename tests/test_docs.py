"""The documentation stays true: README.md is short, every `sparseattn` command shown in the
README and docs/*.md parses with the package's own argument parser (and names registered
methods and policies with valid knobs), and every relative link points to an existing file.

No model is loaded: commands are parsed, never run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

import sparseattn
from sparseattn.errors import UsageError
from sparseattn.parsing import parse_value
from sparseattn.registry import METHODS, POLICIES, build_method, build_policy
from sparseattn.setting import Setting

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

# Fenced blocks whose lines are shell commands; other languages (python, text: program output,
# toml, json) are not commands.
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
# A command holding <...> has a placeholder the reader fills in (e.g. `--out <dir>`), which no
# parser can check; such commands are skipped. Documents should prefer a concrete example value
# (e.g. `--out runs/quick`), which is checked.
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")
CONTROL = {"&&", "||", ";", "|", "&"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def cli_parser() -> argparse.ArgumentParser:
    """The `sparseattn` command's argparse parser: the one place to adapt when the CLI moves."""
    from sparseattn.cli import build_parser

    return build_parser()


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the first line inside the fence
    lang: str
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Command:
    where: str  # "README.md:12"
    text: str  # the command as the document shows it
    argv: tuple[str, ...]  # the arguments after `sparseattn`
    error: str = ""  # why the line could not be split into shell words


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def split_markdown(path: Path) -> tuple[list[Block], list[tuple[int, str]]]:
    """Fenced code blocks, and the other lines (1-based number, text) of a Markdown file."""
    blocks, prose = [], []
    fence, lang, start, body = None, "", 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.lstrip()
        if fence is None:
            match = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if match:
                fence, lang, start, body = match.group(1), match.group(2).lower(), number + 1, []
            else:
                prose.append((number, line))
        elif stripped.startswith(fence) and not stripped[len(fence) :].strip():
            blocks.append(Block(path, start, lang, tuple(body)))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{rel(path)}: code fence opened at line {start - 1} is never closed"
    return blocks, prose


def logical_lines(block: Block):
    """(line number, text) of each shell line, with backslash continuations joined."""
    pending, first = "", 0
    for offset, line in enumerate(block.lines):
        if not pending:
            first = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield first, pending + line
        pending = ""
    if pending:
        yield first, pending


def sparseattn_argv(segment: list[str]) -> list[str] | None:
    """The arguments of one simple command if it runs sparseattn's CLI, else None."""
    while segment and ENV_ASSIGNMENT.match(segment[0]):
        segment = segment[1:]
    for i, token in enumerate(segment):  # drop a redirection and what follows it
        if token and set(token) <= set("<>&"):
            segment = segment[: i - 1] if i and segment[i - 1].isdigit() else segment[:i]
            break
    if segment[:1] == ["sparseattn"]:
        return segment[1:]
    if segment[:1] in (["python"], ["python3"]) and segment[1:3] == ["-m", "sparseattn.cli"]:
        return segment[3:]
    return None


def commands_in(path: Path) -> list[Command]:
    blocks, _ = split_markdown(path)
    found = []
    for block in blocks:
        if block.lang not in SHELL_LANGS:
            continue
        for number, text in logical_lines(block):
            text = text.strip().removeprefix("$ ")
            if not text or text.startswith("#") or PLACEHOLDER.search(text):
                continue
            lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            try:
                tokens = list(lexer)
            except ValueError as err:  # e.g. an unclosed quote
                if re.search(r"\bsparseattn(\s|\.cli\b)", text):
                    found.append(Command(f"{rel(path)}:{number}", text, (), f"shell: {err}"))
                continue
            segments, current = [], []
            for token in tokens:
                if token in CONTROL:
                    segments.append(current)
                    current = []
                else:
                    current.append(token)
            segments.append(current)
            for segment in segments:
                argv = sparseattn_argv(segment)
                if argv is not None:
                    found.append(Command(f"{rel(path)}:{number}", text, tuple(argv)))
    return found


COMMANDS = [command for path in DOCS for command in commands_in(path)]


def parse(command: Command) -> argparse.Namespace | None:
    """The parsed arguments; None for a --help request; pytest.fail naming the command."""
    if command.error:
        pytest.fail(f"{command.where}: `{command.text}`: {command.error}")
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            return cli_parser().parse_args(list(command.argv))
    except SystemExit as exit_:
        if exit_.code in (0, None):
            return None
        message = errors.getvalue().strip().splitlines()
        pytest.fail(
            f"{command.where}: `{command.text}` does not parse: "
            f"{message[-1] if message else exit_.code}"
        )


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/"
    )


def test_docs_show_commands():
    """The extractor finds the commands (a broken extractor would make the tests below vacuous)."""
    wheres = {command.where.split(":")[0] for command in COMMANDS}
    assert {"README.md", "docs/cli.md", "docs/results.md"} <= wheres, wheres
    assert any(c.argv[:3] == ("frontier", "--quick", "--out") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_doc_command_parses(command: Command):
    parse(command)


def _names(text: str | None) -> list[str]:
    return [name for name in (text or "").split(",") if name]


def _knobs(pairs: list[str] | None, command: Command) -> dict:
    knobs = {}
    for pair in pairs or []:
        assert "=" in pair, f"{command.where}: `{command.text}`: knob {pair!r} is not name=value"
        name, value = pair.split("=", 1)
        knobs[name.strip()] = parse_value(value.strip())
    return knobs


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_doc_command_names_registered_settings(command: Command):
    """Methods, policies, knobs and --setting texts a documented command names exist and are
    valid (built the way the command builds them, before any model is loaded)."""
    args = parse(command)
    if args is None:
        return
    try:
        for text in getattr(args, "setting", None) or []:
            _ = Setting.parse(text).parts
        method_names = _names(getattr(args, "method", None))
        for name in method_names + _names(getattr(args, "methods", None)):
            assert name in METHODS, f"unknown method {name!r}"
        for name in _names(getattr(args, "decode", None)) + _names(
            getattr(args, "decode_methods", None)
        ):
            assert name in METHODS, f"unknown decode method {name!r}"
        for name in _names(getattr(args, "evict", None)):
            assert name in POLICIES, f"unknown eviction policy {name!r}"
        if getattr(args, "knob", None) and len(method_names) == 1:
            build_method(method_names[0], **_knobs(args.knob, command))
        if getattr(args, "decode_knob", None) and args.decode:
            build_method(args.decode, **_knobs(args.decode_knob, command))
        if getattr(args, "evict_knob", None) and args.evict:
            build_policy(args.evict, **_knobs(args.evict_knob, command))
    except (UsageError, AssertionError) as err:
        pytest.fail(f"{command.where}: `{command.text}`: {err}")


# -- links ------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, prose = split_markdown(path)
    found, counts = set(), {}
    for _, line in prose:
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:  # a repeated heading gets -1, -2, ... as on GitHub
            base = slug(match.group(1))
            found.add(f"{base}-{counts[base]}" if base in counts else base)
            counts[base] = counts.get(base, 0) + 1
    return found


def links_in(path: Path) -> list[tuple[str, str]]:
    """(where, target) of every link outside code."""
    _, prose = split_markdown(path)
    return [
        (f"{rel(path)}:{number}", target)
        for number, line in prose
        for target in LINK.findall(INLINE_CODE.sub("", line))
    ]


LINKS = [link for path in DOCS for link in links_in(path)]


def test_docs_have_links():
    assert any(where.startswith("README.md") for where, _ in LINKS)


@pytest.mark.parametrize("where, target", LINKS, ids=[f"{w}->{t}" for w, t in LINKS])
def test_relative_link_resolves(where: str, target: str):
    if SCHEME.match(target):
        return  # http(s), mailto: not checked offline
    source = ROOT / where.split(":")[0]
    file_part, _, anchor = target.partition("#")
    destination = (source.parent / file_part).resolve() if file_part else source
    assert destination.exists(), f"{where}: link {target!r} points to a missing {destination}"
    if anchor and destination.suffix == ".md":
        assert anchor in anchors(destination), (
            f"{where}: link {target!r}: no heading with anchor #{anchor} in {rel(destination)}"
        )


def test_readme_python_uses_public_names():
    """Every `sparseattn.NAME` the README's Python shows is exported."""
    blocks, _ = split_markdown(README)
    used = {
        name
        for block in blocks
        if block.lang == "python"
        for name in re.findall(r"\bsparseattn\.(\w+)", "\n".join(block.lines))
    }
    assert used, "README.md shows no Python use of sparseattn"
    missing = sorted(name for name in used if not hasattr(sparseattn, name))
    assert not missing, f"README.md uses sparseattn.{missing} which the package does not export"


@pytest.mark.parametrize("path", [README, ROOT / "docs" / "methods.md"], ids=rel)
def test_every_registered_name_is_documented(path: Path):
    """The README's method list and docs/methods.md name every registered method and policy."""
    text = path.read_text(encoding="utf-8")
    missing = sorted(name for name in {*METHODS, *POLICIES} if f"`{name}`" not in text)
    assert not missing, f"{rel(path)} does not list {missing}: add one line for each"


# --help blocks: a ```text block whose first line is "usage: sparseattn CMD ..." is that
# command's help at HELP_COLUMNS columns; `python tests/test_docs.py --write` rewrites them all
HELP_COLUMNS = "100"
USAGE = re.compile(r"^usage: sparseattn((?: [a-z][a-z_-]*)*)")


def help_blocks(path: Path) -> list[tuple[Block, tuple[str, ...]]]:
    """(block, command words) of every help block in ``path``."""
    found = []
    for block in split_markdown(path)[0]:
        match = USAGE.match(block.lines[0]) if block.lang == "text" and block.lines else None
        if match:
            found.append((block, tuple(match.group(1).split())))
    return found


def help_text(words: tuple[str, ...]) -> str:
    """`sparseattn WORDS --help` as the parser prints it at HELP_COLUMNS columns."""
    import os

    parser, before = cli_parser(), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        for word in words:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            parser = sub.choices[word]
        return parser.format_help().rstrip("\n")
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


HELP_BLOCKS = [(path, block, words) for path in DOCS for block, words in help_blocks(path)]


def test_docs_show_the_help_of_every_command():
    shown = {words for _, _, words in HELP_BLOCKS}
    parser = cli_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set((name,) for name in sub.choices) <= shown, shown


@pytest.mark.parametrize(
    "path, block, words", HELP_BLOCKS, ids=[f"{rel(p)}:{b.line}" for p, b, _ in HELP_BLOCKS]
)
def test_help_blocks_match_the_parser(path, block, words):
    assert "\n".join(block.lines) == help_text(words), (
        f"{rel(path)}:{block.line}: `sparseattn {' '.join(words)} --help` changed; "
        "run `python tests/test_docs.py --write`"
    )


def write_help_blocks() -> None:
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for block, words in reversed(help_blocks(path)):
            first = block.line - 1  # 0-based index of the block's first line
            lines[first : first + len(block.lines)] = help_text(words).splitlines()
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--write"]:
        write_help_blocks()
