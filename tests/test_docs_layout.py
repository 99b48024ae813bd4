"""The README and docs/ against the tree: the README's layout section names every tracked file that it must
(and nothing that is not tracked), and every relative link, repository path, ``make`` target and command-line
option written in README.md and docs/*.md exists.

References are independent of the prose: ``git ls-files`` for the tree, the file system for links and paths,
the Makefile's targets and the argparse option strings in each script's source for commands. Reads text only
(no torch import), so the whole file takes well under a second.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from typing import Dict, List, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
# Folders whose every file the layout section names one by one; other folders (cfgs/, tests/, docs/, ...)
# may be named as a folder with a description of what they hold.
LISTED_FILE_BY_FILE = ('models', 'tools', 'visualize', 'data')
# First path components a path written in the docs may start with (repository-relative paths).
REPO_DIRS = ('.ci', 'cfgs', 'data', 'docs', 'models', 'tests', 'tools', 'visualize')


def doc_files() -> List[str]:
    return [README] + sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def read(path: str) -> str:
    with open(path, encoding='utf-8') as f:
        return f.read()


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def layout_entries(text: str) -> List[str]:
    """The paths the README's layout section names: the first fenced block after '## Layout', one entry per
    line (its first word); an entry indented by 2k spaces lies in the folder entry k levels up."""
    start = text.index('\n## Layout')
    block = re.search(r'```[^\n]*\n(.*?)```', text[start:], re.S)
    assert block, "README.md: the '## Layout' section has no fenced block"
    entries, parents = [], []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(' '))
        assert indent % 2 == 0 and indent // 2 <= len(parents), f'README.md layout: bad indentation: {line!r}'
        parents = parents[:indent // 2]
        path = ''.join(parents) + line.split()[0]
        entries.append(path)
        if path.endswith('/'):
            parents.append(path[len(''.join(parents)):])
    return entries


def tracked_files() -> List[str]:
    if shutil.which('git') is None or not os.path.exists(os.path.join(ROOT, '.git')):
        pytest.skip('not a git checkout: the layout is checked against `git ls-files`')
    out = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split('\0') if p]


def layout_diff(entries: List[str], tracked: List[str]) -> Tuple[List[str], List[str]]:
    """(names to add, names to remove): every top-level file and folder and every file under
    LISTED_FILE_BY_FILE must be named; every named file must be tracked and every named folder hold one."""
    named_files = {e for e in entries if not e.endswith('/')}
    named_dirs = {e for e in entries if e.endswith('/')}
    covered_top = {e.split('/')[0] for e in entries}
    add = []
    for path in tracked:
        parts = path.split('/')
        if len(parts) == 1 or parts[0] in LISTED_FILE_BY_FILE:
            if path not in named_files:
                add.append(path)
        elif parts[0] not in covered_top:
            add.append(parts[0] + '/')
    folders = {'/'.join(p.split('/')[:i]) + '/' for p in tracked for i in range(1, p.count('/') + 1)}
    remove = sorted(f for f in named_files if f not in set(tracked)) + sorted(d for d in named_dirs
                                                                            if d not in folders)
    return sorted(set(add)), remove


def test_layout_names_every_tracked_file():
    add, _ = layout_diff(layout_entries(read(README)), tracked_files())
    assert not add, ("README.md '## Layout' does not name these tracked files/folders; add one line each, "
                     "indented under its folder with what it holds (files of a folder: two spaces and the "
                     "file name): " + ', '.join(add))


def test_layout_names_nothing_missing():
    _, remove = layout_diff(layout_entries(read(README)), tracked_files())
    assert not remove, ("README.md '## Layout' names files/folders that `git ls-files` does not have; remove "
                        "or rename these lines: " + ', '.join(remove))


def test_layout_diff_catches_both_directions():
    """The checker itself: a file missing from the list and a listed file missing from the tree are both
    reported, with the folder-relative indentation resolved."""
    entries = layout_entries('x\n## Layout\n```\nREADME.md  this\nmodels/  lib\n  a.py  a\n  gone.py  old\n'
                             'cfgs/  configs\n```\n')
    assert entries == ['README.md', 'models/', 'models/a.py', 'models/gone.py', 'cfgs/']
    tracked = ['README.md', 'Makefile', 'models/a.py', 'models/new.py', 'cfgs/x.yaml', 'cfgs/demo/y.yaml',
               'tests/test_a.py']
    assert layout_diff(entries, tracked) == (['Makefile', 'models/new.py', 'tests/'], ['models/gone.py'])


# ---- links, paths, commands ---------------------------------------------------------------------------


def split_fences(text: str) -> Tuple[str, List[Tuple[str, str]]]:
    """(the prose with fenced blocks removed, [(language, body) of each fenced block]), fences paired in
    order of the lines that open and close them."""
    prose, blocks, body, lang = [], [], None, ''
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith('```'):
            if body is None:
                body, lang = [], line.strip()[3:].strip()
            else:
                blocks.append((lang, ''.join(body)))
                body = None
        elif body is None:
            prose.append(line)
        else:
            body.append(line)
    return ''.join(prose), blocks


def strip_code(text: str) -> str:
    """The prose only: fenced blocks and inline code removed (a link inside code is not a link)."""
    return re.sub(r'`[^`\n]*`', '', split_fences(text)[0])


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation except '-' and '_' dropped, spaces -> '-'."""
    text = re.sub(r'[`*]', '', heading.strip().lower())
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(path: str) -> Set[str]:
    text = split_fences(read(path))[0]
    return {github_slug(m.group(1)) for m in re.finditer(r'^#{1,6} +(.+)$', text, re.M)}


def test_every_relative_link_resolves():
    bad = []
    for doc in doc_files():
        for target in re.findall(r'\]\(([^)\s]+)\)', strip_code(read(doc))):
            if re.match(r'[a-z]+:', target):                     # http(s):, mailto:
                continue
            path, _, anchor = target.partition('#')
            full = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
            if not os.path.exists(full):
                bad.append(f'{rel(doc)}: {target} (no such file)')
            elif anchor and full.endswith('.md') and anchor not in anchors(full):
                bad.append(f'{rel(doc)}: {target} (no heading with that anchor in {rel(full)})')
    assert not bad, 'broken links: ' + '; '.join(bad)


def test_repository_paths_named_in_the_docs_exist():
    """Every repository path the docs write (``cfgs/x.yaml``, ``models/y.py``, ``tests/fixtures/...``)
    exists; placeholders (``<...>``, globs, ``{a,b}``) are skipped."""
    pattern = re.compile(r'(?<![\w./<>@-])((?:%s)/[\w./-]*)' % '|'.join(re.escape(d) for d in REPO_DIRS))
    bad = []
    for doc in doc_files():
        text = read(doc)
        for m in pattern.finditer(text):
            path = m.group(1).rstrip('.')
            if text[m.end():m.end() + 1] in ('*', '<', '{'):
                continue
            if not os.path.exists(os.path.join(ROOT, path)):
                bad.append(f'{rel(doc)}: {path}')
    assert not bad, 'paths named in the docs that do not exist: ' + ', '.join(sorted(set(bad)))


def commands(text: str) -> List[str]:
    """Shell lines of the ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for lang, block in split_fences(text)[1]:
        if lang not in ('bash', 'sh'):
            continue
        for line in block.replace('\\\n', ' ').splitlines():
            lines.append(re.split(r'(?:^|\s)#', line, maxsplit=1)[0])
    return lines


def script_sources(token: str, module: bool) -> List[str]:
    """The source files whose option strings a command of ``token`` (a script path, or a module for
    ``python -m``) may use; [] for what is not this repository's (pytest, torch.distributed.launch)."""
    if module:
        base = os.path.join(ROOT, *token.split('.'))
        if os.path.isdir(base):
            return sorted(glob.glob(os.path.join(base, '**', '*.py'), recursive=True))
        return [base + '.py'] if os.path.exists(base + '.py') else []
    if token in ('main.py', 'main_ema.py'):
        return [os.path.join(ROOT, 'main.py')]
    if token.startswith('tools/') and token.endswith('.py'):     # a tool and the modules it is split into
        return sorted(glob.glob(os.path.join(ROOT, 'tools', '**', '*.py'), recursive=True))
    return []


def test_command_lines_use_existing_options_and_targets():
    sources: Dict[str, str] = {}
    targets = set(re.findall(r'^([\w-]+):', read(os.path.join(ROOT, 'Makefile')), re.M))
    bad = []
    for doc in doc_files():
        for line in commands(read(doc)):
            for target in re.findall(r'(?:^|[;&|]\s*)make ([a-z][\w-]*)', line.strip()):
                if target not in targets:
                    bad.append(f'{rel(doc)}: make {target} (no such Makefile target)')
            for cmd in re.split(r'[;|]|&&', line):
                words = cmd.split()
                for i, word in enumerate(words):
                    module = i > 0 and words[i - 1] == '-m'
                    files = script_sources(word, module)
                    if not files:
                        continue
                    text = ''.join(sources.setdefault(f, read(f)) for f in files)
                    for opt in (w.split('=')[0] for w in words[i + 1:] if re.match(r'--[a-z]', w)):
                        names = [opt] + (['--' + opt[5:]] if opt.startswith('--no-') else [])
                        if not any(f"'{n}'" in text or f'"{n}"' in text for n in names):
                            bad.append(f'{rel(doc)}: {word} {opt}')
                    break
    assert not bad, 'commands in the docs with options or targets that do not exist: ' + '; '.join(bad)
