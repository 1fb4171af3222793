"""Code and docs cite docs/official_behaviour.md by anchor: every cited anchor exists there, and nothing cites the
reference notes that are not part of the repository."""
import functools
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "official_behaviour.md"
SKIP = {"build", "dist", "output", "__pycache__", "node_modules"}
# a citation: the path with its first anchor, then more anchors of the same file as `, #other` / ` and #other`
CITATION = re.compile(r"official_behaviour\.md#([a-z0-9-]+)((?:(?:,| and) #[a-z0-9-]+)*)")


def _sources():
    for folder, subfolders, files in os.walk(ROOT):
        # hidden folders (.git, .venv), build outputs and generated data hold nothing the project wrote
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in SKIP
                         and os.path.join(folder, d) != str(ROOT / "data" / "synthetic")]
        for name in files:
            path = Path(folder) / name
            if path.suffix in {".py", ".md", ".sh", ".cpp", ".h"} and path != Path(__file__).resolve():
                yield path.relative_to(ROOT), path.read_text(encoding="utf-8", errors="replace")


def test_every_cited_anchor_exists():
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', DOC.read_text(encoding="utf-8")))
    assert {"loss-normalisation", "scorer-defects", "training-image-view"} <= anchors
    missing, cited_files = [], set()
    for rel, text in _sources():
        for match in CITATION.finditer(text):
            cited = [match.group(1)] + re.findall(r"#([a-z0-9-]+)", match.group(2))
            missing += [f"{rel}: #{a}" for a in cited if a not in anchors]
            cited_files.add(rel)
    internal = re.findall(r"\]\(#([a-z0-9-]+)\)", DOC.read_text(encoding="utf-8"))
    missing += [f"docs/official_behaviour.md: #{a}" for a in internal if a not in anchors]
    assert len(cited_files) > 40 and internal  # the scan saw the citations
    assert not missing, f"anchors cited but not defined in docs/official_behaviour.md: {missing}"


def test_no_citation_of_notes_outside_the_repository():
    stale = [f"{rel}:{n}" for rel, text in _sources() for n, line in enumerate(text.splitlines(), 1)
             if re.search(r"kosmos2-spec|hf-port-and-user-asks|\bspec §|§\d", line)]
    assert not stale, f"cite docs/official_behaviour.md#<anchor> instead: {stale}"


@functools.cache
def anchors_of(path: Path) -> frozenset[str]:
    """`github_anchors` of a file, read once however many links point into it."""
    return frozenset(github_anchors(path.read_text(encoding="utf-8")))


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a markdown file: each heading's slug (lower case, punctuation other than '-' and '_'
    dropped, spaces to '-'; a repeated slug gets -1, -2, ...) and every explicit `<a id="...">`."""
    anchors, seen, fenced = set(re.findall(r'<a id="([^"]+)"></a>', markdown)), {}, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_github_anchors_follow_githubs_slugs():
    text = "# Training\n## Building GRIT from image-text pairs (`data/build_grit.py`)\n## Training\n```\n# not a heading\n```"
    assert github_anchors(text) == {"training", "building-grit-from-image-text-pairs-databuild_gritpy", "training-1"}


def test_every_markdown_link_to_a_project_file_resolves():
    """`[text](path.md#anchor)`, `[text](path)` and `[text](#anchor)` in the project's markdown: the file exists and,
    for a markdown file, so does the heading (moving a section of the docs must move its links too)."""
    broken, links = [], 0
    for rel, text in _sources():
        if rel.suffix != ".md":
            continue
        for target, anchor in re.findall(r"\]\(([^)\s#]*)(?:#([^)\s]+))?\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = (ROOT / rel).parent / target if target else ROOT / rel
            links += 1
            if not path.exists():
                broken.append(f"{rel}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors_of(path.resolve()):
                broken.append(f"{rel}: {target}#{anchor} (no such heading)")
    assert links > 30  # the scan saw the links
    assert not broken, f"links that lead nowhere: {broken}"
