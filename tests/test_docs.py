"""The documentation holds together: every relative link in README.md and docs/*.md reaches a file of the clone
(and a heading of it, when the link names one), the README stays a short guide, the sections that code and error
messages cite by name ("README: Trust model") exist, and the generated configuration reference matches the config."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a code block is no heading, a `[x](y)` no link)."""
    lines, in_code = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(page: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in prose_lines(page.read_text()) if re.match(r"#{1,6} ", line)]


def relative_links(page: Path) -> list[str]:
    return [target for line in prose_lines(page.read_text()) for target in LINK.findall(line)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto: leave the clone


def link_problem(page: Path, target: str) -> str | None:
    path, _, fragment = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    if not linked.is_relative_to(ROOT) or not linked.is_file():
        return f"{page.relative_to(ROOT)}: {target} names no file of the clone"
    if fragment and linked.suffix == ".md" and fragment not in {anchor(h) for h in headings(linked)}:
        return f"{page.relative_to(ROOT)}: {target} names no heading of {linked.relative_to(ROOT)}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    links = relative_links(page)
    problems = [problem for target in links if (problem := link_problem(page, target))]
    assert not problems, "\n".join(problems)


def test_the_docs_pages_are_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(ROOT / "README.md")}
    unlinked = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_is_a_short_guide():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to a page under docs/"
    # The quick start's test line is CI's contract (.ci/run runs `make test`).
    assert any(line.startswith("make test   # the whole test suite") for line in lines)


CITED_SECTION = re.compile(r"\(README: ([^)]+)\)")


def test_sections_the_code_cites_exist():
    """Error messages and docstrings send readers to README sections by name (`(README: Trust model)`)."""
    cited = {}
    for source in [*ROOT.glob("alignment_core/**/*.py"), *ROOT.glob("flows/*.py"), *ROOT.glob("tasks/*.py")]:
        for names in CITED_SECTION.findall(source.read_text()):
            for name in names.split(", "):
                cited.setdefault(name.strip(), source.relative_to(ROOT))
    assert cited, "no (README: section) citation found: the pattern no longer matches the code's"
    readme = set(headings(ROOT / "README.md"))
    missing = {name: str(where) for name, where in cited.items() if name not in readme}
    assert not missing, f"README sections cited by the code but missing: {missing}"


def test_configuration_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    config_reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_reference)
    page = config_reference.render()
    assert "| `beta` | float (> 0) | `0.1` |" in page  # a field with its type, bound and default
    assert "## `annotation`" in page and "### `annotation.judge`" in page  # nested sections, depth first
    assert (ROOT / "docs" / "configuration.md").read_text() == page, (
        "docs/configuration.md is out of date: run python scripts/config_reference.py")


def test_every_hand_mutant_names_a_snippet_found_once_in_its_file():
    """docs/mutation-round.md comes from scripts/mutation_round.py, which reports a stale mutant only when it runs:
    a module that moves (the config and data packages did) must take its mutants along."""
    spec = importlib.util.spec_from_file_location("mutation_round", ROOT / "scripts" / "mutation_round.py")
    mutation_round = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutation_round)
    stale = [(mutant.file, mutant.what) for mutant in mutation_round.MUTANTS
             if not (ROOT / mutant.file).exists() or (ROOT / mutant.file).read_text().count(mutant.old) != 1]
    assert stale == []
    assert all((ROOT / path).exists() for paths in mutation_round.TESTS.values() for path in paths)
