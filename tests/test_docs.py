"""The documentation holds together: every relative link and #anchor in README.md and docs/*.md
resolves in a clone, every citation of docs/upstream.md names a heading that exists there, and
nothing points outside the repository."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/upstream\.md#([a-z0-9_-]+)")
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(<?([^)\s>]*)>?(?: \"[^\"]*\")?\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*<?(\S+?)>?(?:[ \t]+\"[^\"]*\")?[ \t]*$", re.M)
HTML_LINK = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)=\"([^\"]+)\"", re.I)


def repository_files() -> list[str]:
    """What a clone holds (plus new files not ignored): the paths a link may name."""
    return subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                          cwd=REPO, capture_output=True, text=True, check=True).stdout.split()


def tracked_text_files() -> list[Path]:
    return [REPO / n for n in repository_files()
            if n.endswith((".py", ".md", ".sh", ".txt", ".toml"))]


def documentation() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose(text: str, keep_code: bool) -> str:
    """The Markdown outside fenced code blocks (their lines left empty, so line numbers hold),
    with inline code replaced by its text (keep_code) or by a word without links."""
    lines, fence = [], None
    for line in text.splitlines():
        opening = FENCE.match(line)
        if fence is None and opening:
            fence, line = opening[1][0] * len(opening[1]), ""
        elif fence is not None:
            fence, line = (None if line.strip().startswith(fence) else fence), ""
        lines.append(re.sub(r"(`+)(.+?)\1", r"\2" if keep_code else "code", line))
    return "\n".join(lines)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: the rendered text (links' and code's text kept,
    their markup dropped) in lower case, every character that is not a letter, digit, '_', '-'
    or space dropped, spaces -> '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's id in a Markdown text; a repeated one gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    ids = set()
    for line in prose(text, keep_code=True).splitlines():
        match = HEADING.match(line)
        if match:
            slug = github_anchor(match[2])
            ids.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return ids


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code; a link's text may span lines."""
    body = prose(text, keep_code=False)
    found = sorted((match.start(1), match[1]) for pattern in (INLINE_LINK, REFERENCE_LINK,
                   HTML_LINK) for match in pattern.finditer(body))
    return [(body.count("\n", 0, start) + 1, target) for start, target in found]


def broken_links(page: Path, text: str, files: set[str]) -> list[str]:
    """The links of the Markdown `text` of `page` that a reader of a clone could not follow."""
    folders = {p.as_posix() for f in files for p in Path(f).parents}
    broken = []
    for number, target in links(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...: not ours
            continue
        file_part, _, anchor = target.partition("#")
        where = (page.parent / file_part).resolve() if file_part else page
        if not where.is_relative_to(REPO):
            broken.append(f"{number}: {target} leaves the repository")
            continue
        name = where.relative_to(REPO).as_posix()
        if file_part and name not in files and name not in folders:
            broken.append(f"{number}: {target}: no such file in the repository")
        elif anchor and name.endswith(".md") and anchor not in anchors(
                text if where == page else where.read_text()):
            broken.append(f"{number}: {target}: no heading #{anchor} in {name}")
    return broken


@pytest.mark.parametrize("page", documentation(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    text = page.read_text()
    assert page.name != "README.md" or len(links(text)) > 10  # the front page links to its pages
    assert broken_links(page, text, set(repository_files())) == []


def test_the_link_check_finds_broken_links():
    """The checker itself, on a page made up here: a missing file, a missing anchor, a link out of
    the repository, and headings' ids by GitHub's rules (punctuation dropped, '_' kept, repeats
    numbered, code and links as their text, fenced code ignored)."""
    page = REPO / "docs" / "made-up.md"
    text = ("# Preemption, time limits: `--requeue` & [more](gpu.md)\n## Twice\n## Twice\n"
            "### snake_case (FID)\n"
            "```bash\n# not a heading\n[in code](nowhere.md)\n```\n"
            "[a](#preemption-time-limits---requeue--more) [b](#twice-1) [c](#snake_case-fid)\n"
            "[d](upstream.md#usm-block) ![e](../benchmarks/results/scaling_cpu.png) [f](../tests)\n"
            "[g](https://example.org/x.md) `[h](ignored.md)` <a href=\"gpu.md\">i</a>\n"
            "[j](upstream.md#no-such-heading) [k](no-such-file.md) [l](../../outside.md)\n"
            "[m](#twice-2) [n](../README.md#not-a-heading-there)\n")
    assert anchors(text) == {"preemption-time-limits---requeue--more", "twice", "twice-1",
                             "snake_case-fid"}
    assert broken_links(page, text, set(repository_files())) == [
        "12: upstream.md#no-such-heading: no heading #no-such-heading in docs/upstream.md",
        "12: no-such-file.md: no such file in the repository",
        "12: ../../outside.md leaves the repository",
        "13: #twice-2: no heading #twice-2 in docs/made-up.md",
        "13: ../README.md#not-a-heading-there: no heading #not-a-heading-there in README.md",
    ]


def test_every_citation_of_docs_upstream_names_a_heading():
    known = anchors((REPO / "docs" / "upstream.md").read_text())
    cited = {(path.relative_to(REPO).as_posix(), anchor) for path in tracked_text_files()
             for anchor in CITATION.findall(path.read_text(errors="replace"))}
    assert len(cited) > 10  # the code and tests do cite it
    assert [c for c in cited if c[1] not in known] == []


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|UPSTREAM\.md|SPEC\.md|\bSPEC\b")
    hits = [f"{path.relative_to(REPO)}:{i}" for path in tracked_text_files()
            if path.name != "test_docs.py"
            for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
            if outside.search(line)]
    assert hits == []
