"""The README's facts about the source that drift when the code changes (line ranges, line counts) are computed
here from the files themselves: a change that moves them fails this test, whose message gives the lines to paste."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest
from conftest import REPO


def lines(name: str) -> list[str]:
    return (REPO / name).read_text().splitlines()


def assignment(name: str, target: str) -> tuple[int, int]:
    """First and last line of a top-level `target = ...` (or `target: T = ...`) in a file."""
    for node in ast.parse((REPO / name).read_text()).body:
        names = [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)]
        if target in names:
            return node.lineno, node.end_lineno
    raise AssertionError(f"{name} has no top-level {target} assignment")


def readme_facts() -> list[str]:
    """The README's sentences and table rows that state line numbers or counts, as the code now has them."""
    model, data, train, sweep = (len(lines(name)) for name in ("model.py", "datamodule.py", "train.py", "sweep.py"))
    data_end = assignment("datamodule.py", "DEFAULT_DATASET")[1]  # DATASETS, their build functions, the default
    marked = [i for i, line in enumerate(lines("train.py"), 1) if line.startswith("# ----")]
    section = marked[0], marked[1]  # "# ---- What you change ----" ... "# ------"
    section_lines = section[1] - section[0] + 1
    config = assignment("sweep.py", "SWEEP_CONFIG")
    return [
        f"| `model.py` | your LightningModule (the example: a small CNN) | {model} |",
        f"| `datamodule.py`, lines 1-{data_end} | `DATASETS` and their build functions, `DEFAULT_DATASET`; or "
        f"replace the DataModule (rest of the file) | {data} in all |",
        f'| `train.py`, lines {section[0]}-{section[1]}, "What you change" | `MODEL_CLASS`, `DATAMODULE_CLASS`, '
        f"`MONITOR` and `MONITOR_MODE`, `MAX_EPOCHS`, `PATIENCE`, `LINKED` | {section_lines} of {train} |",
        f"| `sweep.py`, lines {config[0]}-{config[1]} | `SWEEP_CONFIG`: what a sweep tries (full dotted train.py "
        f"keys) | {config[1] - config[0] + 1} of {sweep} |",
        f"train.py's section ({model + section_lines} lines)",
        f"`datamodule.py` down to `DEFAULT_DATASET` ({data_end})",
    ]


def test_the_readme_states_the_line_ranges_and_counts_the_code_has() -> None:
    readme = " ".join((REPO / "README.md").read_text().split())  # a sentence may wrap anywhere
    stale = [fact for fact in readme_facts() if " ".join(fact.split()) not in readme]
    assert not stale, "README.md is out of date; it should say:\n" + "\n".join(stale)


@pytest.mark.slow
def test_the_readme_states_how_many_tests_each_tier_has() -> None:
    """`make test`'s fast tier and the whole suite (CI), as pytest collects them now (~15 s: collection imports
    every test module, so it runs with the slow tests)."""
    def collected(*marks: str) -> int:
        out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *marks], cwd=REPO,
                             capture_output=True, text=True, timeout=300).stdout
        return int(re.search(r"^(\d+)(?:/\d+)? tests? collected", out, re.MULTILINE).group(1))

    everything, fast = collected(), collected("-m", "not slow")
    readme = " ".join((REPO / "README.md").read_text().split())
    fact = f"the fast tier: {fast} of the {everything} tests"
    assert fact in readme, f"README.md is out of date; it should say: {fact}"


# README.md is the newcomer's path, docs/ the reference: the README stays short, every relative link in either
# resolves (to a file, and for `page.md#anchor` to a heading of that page), and every docs page is reachable.
README_MAX_LINES = 400
DOCS = REPO / "docs"
MAINTAINERS_ONLY = {"template.md"}  # copier.yml keeps it out of projects; README links it as the maintainers' page


def pages() -> list:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where `#` and `[x](y)` are not Markdown."""
    text = re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`]*`", "", text)


def anchors(path) -> set[str]:
    """The GitHub-style anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered (`name`, `name-1`, ...)."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = re.match(r"#{1,6} (.*)", line)
        if fenced or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def relative_links(path) -> list[str]:
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(path.read_text()))
    return [target for target in targets if not re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target)]


def test_the_readme_is_at_most_400_lines() -> None:
    count = len((REPO / "README.md").read_text().splitlines())
    assert count <= README_MAX_LINES, (f"README.md has {count} lines, over {README_MAX_LINES}: it is the newcomer's "
                                       "path; move reference text into a docs/ page and link it from 'Read more'")


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    broken = []
    for page in pages():
        for target in relative_links(page):
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no file {file})")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(REPO)}: {target} (no heading #{anchor} in {linked.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = REPO / "README.md"
    linked = {(readme.parent / target.partition("#")[0]).resolve() for target in relative_links(readme)}
    unlinked = [page.name for page in sorted(DOCS.glob("*.md"))
                if page.name not in MAINTAINERS_ONLY and page.resolve() not in linked]
    assert not unlinked, f"docs pages that README.md's 'Read more' does not link: {', '.join(unlinked)}"
