"""The README's first commands are the ones CI runs, the README stays a front page, and every
relative link in README.md and docs/*.md points to a file (and heading) that exists.

Run as a script, it prints each broken link: `python tests/readme_test.py`.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README_MAX_LINES = 120
# [text](target) and ![alt](target), with an optional "title"; code is stripped first.
LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
FENCE = re.compile(r'^(```|~~~).*?^\1', flags=re.M | re.S)
INLINE_CODE = re.compile(r'`[^`\n]*`')
HEADING = re.compile(r'^#{1,6}\s+(.*?)\s*#*\s*$', flags=re.M)


def markdown_files() -> list[pathlib.Path]:
  return [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]


def _prose(text: str) -> str:
  return INLINE_CODE.sub('', FENCE.sub('', text))


def anchors(path: pathlib.Path) -> set[str]:
  """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -1, -2 ... for
  repeats."""
  seen: dict[str, int] = {}
  out = set()
  for heading in HEADING.findall(FENCE.sub('', path.read_text())):
    slug = re.sub(r'[^\w\- ]', '', heading.replace('`', '').lower()).replace(' ', '-')
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    out.add(slug if n == 0 else f'{slug}-{n}')
  return out


def broken_links(path: pathlib.Path) -> list[str]:
  """'file: target (why)' for each relative link of `path` that does not resolve."""
  broken = []
  for target in LINK.findall(_prose(path.read_text())):
    if re.match(r'[a-zA-Z][a-zA-Z0-9+.-]*:', target):  # http:, https:, mailto: ...
      continue
    file_part, _, anchor = target.partition('#')
    resolved = (path.parent / file_part).resolve() if file_part else path
    where = f'{path.relative_to(ROOT)}: {target}'
    if not resolved.exists():
      broken.append(f'{where} (no such file)')
    elif anchor and resolved.suffix == '.md' and anchor not in anchors(resolved):
      broken.append(f'{where} (no such heading)')
  return broken


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / 'README.md').read_text()
  ci = (ROOT / '.ci' / 'run').read_text()
  commands = re.findall(r'^(pip install .*)$', readme, flags=re.M)
  test_command = next(c for c in commands if 'pytest' in c)
  assert test_command in ci.splitlines()
  # The two quickstart commands come first.
  assert readme.index(test_command) < readme.index('## ')


def test_readme_is_a_front_page():
  lines = (ROOT / 'README.md').read_text().splitlines()
  assert len(lines) <= README_MAX_LINES, (
      f'README.md has {len(lines)} lines; move detail into docs/ (at most {README_MAX_LINES})')


def test_every_relative_link_resolves():
  files = markdown_files()
  assert len(files) > 1 and LINK.search(files[0].read_text())  # the README links to docs/
  broken = [b for f in files for b in broken_links(f)]
  assert not broken, '\n'.join(broken)


def test_the_link_check_catches_a_broken_link(tmp_path, monkeypatch):
  """The check itself can fail: a missing file and a missing heading are both reported."""
  monkeypatch.setitem(globals(), 'ROOT', tmp_path)
  (tmp_path / 'docs').mkdir()
  page = tmp_path / 'docs' / 'a.md'
  page.write_text('# A page\n\n## Two `words`\n\n[ok](#two-words) [ok](a.md#a-page) '
                  '[bad](b.md) [bad](#three) `[code](c.md)` [web](https://x.org/y.md)\n')
  assert broken_links(page) == ['docs/a.md: b.md (no such file)',
                                'docs/a.md: #three (no such heading)']


def test_docs_cite_no_issue_numbers():
  """The pages speak for themselves: no 'issue 4' or '#12' references to a tracker."""
  for path in markdown_files():
    prose = _prose(path.read_text())
    assert not re.search(r'\bissues? #?\d', prose, flags=re.I), path.name


if __name__ == '__main__':
  files = markdown_files()
  problems = [b for f in files for b in broken_links(f)]
  count = sum(len(LINK.findall(_prose(f.read_text()))) for f in files)
  print(f'{count} links in {len(files)} files; {len(problems)} broken')
  print('\n'.join(problems))
  raise SystemExit(1 if problems else 0)
