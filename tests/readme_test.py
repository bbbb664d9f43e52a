"""The README's first commands are the ones CI runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / 'README.md').read_text()
  ci = (ROOT / '.ci' / 'run').read_text()
  commands = re.findall(r'^(pip install .*)$', readme, flags=re.M)
  test_command = next(c for c in commands if 'pytest' in c)
  assert test_command in ci.splitlines()
  # The two quickstart commands come first.
  assert readme.index(test_command) < readme.index('## ')
