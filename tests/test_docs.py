"""The repository is self-contained: nothing points outside it, and every citation of
docs/upstream.md names a heading that exists there."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/upstream\.md#([a-z0-9-]+)")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if n.endswith((".py", ".md", ".sh", ".txt", ".toml"))]


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


def test_every_citation_of_docs_upstream_names_a_heading():
    headings = re.findall(r"^#+ (.+)$", (REPO / "docs" / "upstream.md").read_text(), re.M)
    anchors = {github_anchor(h) for h in headings}
    cited = {(path.relative_to(REPO).as_posix(), anchor) for path in tracked_text_files()
             for anchor in CITATION.findall(path.read_text(errors="replace"))}
    assert len(cited) > 10  # the code and tests do cite it
    assert [c for c in cited if c[1] not in anchors] == []


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|UPSTREAM\.md|SPEC\.md|\bSPEC\b")
    hits = [f"{path.relative_to(REPO)}:{i}" for path in tracked_text_files()
            if path.name != "test_docs.py"
            for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
            if outside.search(line)]
    assert hits == []
