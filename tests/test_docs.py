"""The README and docs/ are the first things a newcomer reads and runs: their commands, links, paths and
reference must stay true.

README.md is the front door (at most 300 lines: the two commands, the commands in order, the demo's
table, the recipes, where things are); everything else lives in docs/*.md. The helpers below return
what is wrong, so each check is also tested against a planted mistake (the `*_catches_*` tests).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from finetune.cli.main import build_parser
from scripts.recipe_reference import main as reference_main

ROOT = Path(__file__).resolve().parents[1]
README_PATH = ROOT / "README.md"
README = README_PATH.read_text()
DOC_PATHS = sorted((ROOT / "docs").glob("*.md"))
ALL_PATHS = [README_PATH, *DOC_PATHS]
SETUP = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e"
MAX_README_LINES = 300

FENCE = re.compile(r"^```.*?^```[ \t]*$", flags=re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"(?<![\w/.-])((?:finetune|data_tools|scripts)/[\w./-]*?\.py)\b")
DOTTED = re.compile(r"(?<![\w/.-])((?:finetune|data_tools|scripts)(?:\.\w+)+)")
PYTHON_M = re.compile(r"\bpython3? -m ((?:finetune|data_tools|scripts)(?:\.\w+)+)")


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def bash_lines(text: str) -> list[str]:
    return [line for block in bash_blocks(text) for line in block.splitlines()]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --- helpers: each returns the problems it found ---------------------------------------------------


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings (code blocks skipped; repeated headings get -1, -2)."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for line in FENCE.sub("", text).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def broken_links(path: Path, text: str) -> list[str]:
    """Relative links (outside code) whose file does not exist, or whose #anchor names no heading there."""
    problems = []
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{_rel(path)}: link to missing {target}")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in github_anchors(resolved.read_text()):
            problems.append(f"{_rel(path)}: link {target}: no heading with anchor #{anchor} in {_rel(resolved)}")
    return problems


def missing_code_paths(text: str, root: Path = ROOT) -> list[str]:
    """`finetune/...py`, `data_tools/...py`, `scripts/...py` paths that do not exist."""
    return sorted({p for p in CODE_PATH.findall(text) if not (root / p).is_file()})


def _module_file(parts: list[str], root: Path) -> Path | None:
    base = root.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _defines(module: Path, name: str) -> bool:
    source = module.read_text()
    return re.search(rf"^(?:def|class|async def)\s+{re.escape(name)}\b|^{re.escape(name)}\s*[:=]", source, flags=re.M) is not None


def missing_modules(text: str, root: Path = ROOT) -> list[str]:
    """Dotted names (`finetune.models.adapter.load_adapted`) that name no module, or an attribute the module
    does not define at top level; `python -m X` targets that cannot run (no X.py, no X/__main__.py)."""
    problems = set()
    for target in PYTHON_M.findall(text):
        base = root.joinpath(*target.split("."))
        if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
            problems.add(f"python -m {target}")
    for dotted in DOTTED.findall(text):
        parts = dotted.split(".")
        k = len(parts)
        while k > 0 and _module_file(parts[:k], root) is None:
            k -= 1
        if k == len(parts):
            continue
        module = _module_file(parts[:k], root) if k >= 2 else None
        if module is None or not _defines(module, parts[k]):
            problems.add(dotted)
    return sorted(problems)


def _subcommands() -> dict:
    parser = build_parser()
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices


def bad_domainclip_lines(text: str) -> list[str]:
    """```bash lines that run `domainclip X`: X must be a real subcommand, and the line must parse."""
    choices = _subcommands()
    problems = []
    for line in bash_lines(text):
        match = re.search(r"(?:^|&&\s*)domainclip\s+(.*)$", line.strip())
        if not match:
            continue
        argv = shlex.split(match.group(1), comments=True)
        if not argv or argv[0] not in choices:
            problems.append(f"not a domainclip subcommand ({sorted(choices)}): {line}")
            continue
        parser = build_parser()
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                args, extra = parser.parse_known_args(argv)
        except SystemExit:
            problems.append(f"does not parse ({err.getvalue().strip().splitlines()[-1]}): {line}")
            continue
        if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
            problems.append(f"unrecognized arguments {extra}: {line}")
    return problems


# --- the README ------------------------------------------------------------------------------------


def test_readme_shows_the_two_commands():
    lines = bash_lines(README)
    demo = [line for line in lines if line.startswith(SETUP) and line.endswith("domainclip train recipes/demo.yaml")]
    tests = [line for line in lines if line.startswith(SETUP) and line.endswith("&& pytest")]
    assert len(demo) == 1 and len(tests) == 1


def test_ci_runs_the_readme_test_command():
    tests = next(line for line in bash_lines(README) if line.endswith("&& pytest"))
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
    assert "set -euo pipefail" in ci


def test_every_recipe_is_documented_in_readme():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 3  # demo, medical, fashion at least: the loop below must check something
    for recipe in recipes:
        assert f"recipes/{recipe.name}" in README, recipe.name


def test_readme_is_a_front_door():
    lines = README.splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_links_every_docs_page():
    assert len(DOC_PATHS) >= 5  # the docs exist: the loop below must check something
    for page in DOC_PATHS:
        assert f"](docs/{page.name}" in README, f"README.md does not link docs/{page.name}"


def test_readme_answers_where_things_are():
    for path in ("data_tools/collate.py", "finetune/training/losses.py", "finetune/retrieval/index.py", "finetune/retrieval/serve/app.py"):
        assert path in README, path


# --- README and docs/*.md --------------------------------------------------------------------------


def test_recipe_reference_is_current():
    assert reference_main(["--check", str(ROOT / "docs" / "recipes.md")]) == 0


@pytest.mark.parametrize("path", ALL_PATHS, ids=_rel)
def test_relative_links_resolve(path):
    assert broken_links(path, path.read_text()) == []


@pytest.mark.parametrize("path", ALL_PATHS, ids=_rel)
def test_code_paths_exist(path):
    text = path.read_text()
    assert missing_code_paths(text) == []
    assert missing_modules(text) == []


@pytest.mark.parametrize("path", ALL_PATHS, ids=_rel)
def test_documented_domainclip_commands_exist(path):
    assert bad_domainclip_lines(path.read_text()) == []


def test_docs_run_every_subcommand_somewhere():
    text = "\n".join(p.read_text() for p in ALL_PATHS)
    shown = {m.group(1) for line in bash_lines(text) if (m := re.search(r"(?:^|&&\s*)domainclip\s+(\S+)", line.strip()))}
    assert set(_subcommands()) - {"validate"} <= shown  # validate is shown inline, not in a bash block


# --- the checks above can fail ---------------------------------------------------------------------


def test_link_check_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    page = tmp_path / "page.md"
    text = "[ok](other.md#a-section) [gone](nope.md) [bad anchor](other.md#no-such) `[code](nope.md)`\n"
    assert broken_links(page, text) == [
        f"{page}: link to missing nope.md",
        f"{page}: link other.md#no-such: no heading with anchor #no-such in {tmp_path / 'other.md'}",
    ]


def test_anchors_follow_github():
    text = "# Serve an index over HTTP: `domainclip serve`\n## What a run writes (`train.output_dir`)\n## Dup\n## Dup\n```\n# not a heading\n```\n"
    assert github_anchors(text) == {"serve-an-index-over-http-domainclip-serve", "what-a-run-writes-trainoutput_dir", "dup", "dup-1"}


def test_path_check_catches_an_old_path():
    text = "see `finetune/model.py`, finetune/training/losses.py and scripts/<name>.py"
    assert missing_code_paths(text) == ["finetune/model.py"]


def test_module_check_catches_old_modules_and_names():
    text = (
        "python -m finetune.cli.main train; `finetune.models.adapter.load_adapted(run)`; "
        "python -m finetune.cli train; `finetune.model.load_adapted`; `finetune.models.adapter.no_such`"
    )
    assert missing_modules(text) == ["finetune.model.load_adapted", "finetune.models.adapter.no_such", "python -m finetune.cli"]


def test_command_check_catches_a_wrong_subcommand_and_option():
    text = "```bash\ndomainclip inspect recipes/demo.yaml\ndomainclip export runs/demo --no-such-flag\ndomainclip mine recipes/demo.yaml a.b=1\n```\n"
    problems = bad_domainclip_lines(text)
    assert len(problems) == 2
    assert problems[0].startswith("not a domainclip subcommand") and "inspect" in problems[0]
    assert "--no-such-flag" in problems[1]
