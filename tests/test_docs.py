"""The README's and docs' relative links point at files that exist, and their #anchors at headings there."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(path: pathlib.Path) -> str:
  """The file without its fenced code blocks: a '#' or '](' inside a command is neither a heading nor a link."""
  return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)


def heading_anchors(path: pathlib.Path) -> set:
  """GitHub's anchors: a heading lower-cased, punctuation but '-' and '_' dropped, spaces made '-'."""
  headings = re.findall(r"^#+\s+(.*)$", prose(path), flags=re.MULTILINE)
  return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def relative_links(path: pathlib.Path):
  for target in LINK.findall(prose(path)):
    if not re.match(r"[a-z]+:", target):
      yield target


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
  broken = []
  for target in relative_links(doc):
    file_part, _, anchor = target.partition("#")
    dest = (doc.parent / file_part).resolve() if file_part else doc
    if not dest.exists():
      broken.append(f"{target}: no such file")
    elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest):
      broken.append(f"{target}: no heading with that anchor")
  assert not broken, f"{doc.name}: " + "; ".join(broken)


def test_anchor_rule(tmp_path):
  """The slug rule itself, on headings of the forms these docs use."""
  doc = tmp_path / "doc.md"
  doc.write_text("# Top\n## 2.6 TFDS datasets\n```\n# not a heading\n```\n### Speed on this CPU: `run.py` (fp32)\n")
  assert heading_anchors(doc) == {"top", "26-tfds-datasets", "speed-on-this-cpu-runpy-fp32"}
