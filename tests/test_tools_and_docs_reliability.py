"""What the README says about repeated augmentation is what the sampler does; tools/plot_runs.py skips a
metrics line that is JSON but not a record, with a warning."""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter

from data.samplers import RepeatedAugSampler
from tools import plot_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def deit_ra_order(n: int, perm: list, repeats: int, rank: int, world: int) -> list:
    """DeiT's RASampler written out from its definition: each index of the permutation ``repeats`` times in
    a row, padded to a multiple of the world size, dealt to the ranks in turn, cut to
    floor(n // 256 * 256 / world) samples per rank."""
    items = [i for i in perm for _ in range(repeats)]
    total = math.ceil(n * repeats / world) * world
    items += items[:total - len(items)]
    return items[rank:total:world][:int(math.floor(n // 256 * 256 / world))]


def test_readme_describes_what_the_repeated_aug_sampler_yields():
    n, repeats = 1438, 3                                   # the digits' training images, the default COUNT
    sampler = RepeatedAugSampler(n, repeats=repeats)
    got = sampler.epoch_indices()
    import torch
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(sampler.seed + sampler.epoch)).tolist()
    assert got == deit_ra_order(n, perm, repeats, 0, 1)
    counts = Counter(got)
    runs = [got[i:i + repeats] for i in range(0, len(got) - len(got) % repeats, repeats)]
    assert len(got) == 1280 and len(counts) == 427 and all(len(set(r)) == 1 for r in runs)   # 3 in a row
    assert sorted(Counter(counts.values()).items()) == [(2, 1), (3, 426)]
    two = [RepeatedAugSampler(n, rank=r, world_size=2, repeats=repeats).epoch_indices() for r in (0, 1)]
    assert two == [deit_ra_order(n, perm, repeats, r, 2) for r in (0, 1)] and len(two[0]) == 640
    with open(os.path.join(ROOT, 'docs', 'training.md')) as f:
        readme = ' '.join(f.read().split())
    start = readme.index('`AUG.REPEATED_AUG` turns on')
    text = readme[start:readme.index('Loaders pin memory', start)]
    for claim in ('times in a row', 'floor(N / 256) * 256 / ranks', '1,438', '1,280 samples', '427 images',
                  'dealt to the ranks in turn'):
        assert claim in text, claim
    assert not re.search(r'each image\s+`?AUG\.REPEATED_AUG_COUNT`? times per epoch', text)


def test_plot_runs_skips_json_lines_that_are_not_records(tmp_path, caplog):
    folder = tmp_path / 'run'
    folder.mkdir()
    lines = [{'kind': 'epoch', 'epoch': 1, 'train_loss': 2.0, 'val_acc1': 10.0, 'lr': 1e-3}, [1, 2], 'text', 7,
             None, {'kind': 'epoch', 'epoch': 2, 'train_loss': 1.0, 'val_acc1': 30.0, 'lr': 5e-4}]
    (folder / 'metrics.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))
    with caplog.at_level(logging.WARNING, logger='plot_runs'):
        fig = plot_runs.plot_runs([str(folder)], str(tmp_path / 'c.png'))
    acc = fig.axes[1].get_lines()[0]
    assert list(acc.get_xdata()) == [1, 2] and list(acc.get_ydata()) == [10.0, 30.0]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and 'skipped 4 line(s) that are not JSON objects' in warned[0]
    assert os.path.getsize(tmp_path / 'c.png') > 1000


# ----------------------------------------------------------------------------- rooms that say what they hold
def _project_sources():
    """(path, parsed module) of every Python file of the project outside tests/."""
    import ast
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('tests', 'shared', '__pycache__')]
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                with open(path) as f:
                    yield os.path.relpath(path, ROOT), ast.parse(f.read())


def test_no_import_cycle_between_the_projects_modules():
    """Top-level modules and packages import each other in one direction only (every import counted, those
    under ``if TYPE_CHECKING`` and inside functions too)."""
    import ast
    tops = {n[:-3] if n.endswith('.py') else n for n in os.listdir(ROOT)
            if n != 'tests' and (n.endswith('.py') or os.path.isfile(os.path.join(ROOT, n, '__init__.py')))}
    graph = {t: set() for t in tops}
    for rel, tree in _project_sources():
        src = rel.split(os.sep)[0]
        src = src[:-3] if src.endswith('.py') else src
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            graph.setdefault(src, set()).update(m.split('.')[0] for m in names if m.split('.')[0] in tops)
    assert {'engine', 'resume', 'checkpoint'} <= tops and 'checkpoint' in graph['engine']     # the walk sees them
    for start in sorted(tops):
        seen, todo = set(), [b for b in graph[start] if b != start]
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo += [b for b in graph.get(node, ()) if b != node]
        assert start not in seen, f'{start} imports itself through {sorted(b for b in graph[start] if b in seen)}'


def test_every_error_class_lives_in_errors_under_one_base():
    import ast
    import inspect

    import errors
    defined = {}
    for rel, tree in _project_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, 'id', getattr(b, 'attr', '')).endswith(('Error', 'Exception')) for b in node.bases):
                defined.setdefault(rel, []).append(node.name)
    assert set(defined) == {'errors.py'}, defined
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == 'errors']
    assert len(classes) >= 8 and all(issubclass(c, errors.ProjectError) for c in classes)
    import engine
    import visualize
    assert engine.Preempted is errors.Preempted and visualize.LayoutError is errors.LayoutError


def test_tools_edit_sys_path_in_one_place():
    """tools/_root.py is the one place a tool puts the repository root on sys.path (``python tools/X.py``);
    the benchmark's official worker puts the user's official checkout first, which is not a path to ours."""
    edits = {}
    for rel, _ in _project_sources():
        if rel.startswith('tools' + os.sep):
            with open(os.path.join(ROOT, rel)) as f:
                n = len(re.findall(r'sys\.path\s*(\[[^\]]*\]\s*=|\.(insert|append|extend)\()', f.read()))
            if n:
                edits[rel] = n
    assert edits == {os.path.join('tools', '_root.py'): 1, os.path.join('tools', 'bench', 'official.py'): 1}


def test_hub_entries_name_files_that_exist():
    import hubconf
    docs = {name: fn.__doc__ for name, fn in vars(hubconf).items() if not name.startswith('_') and callable(fn)
            and 'timm.create_model' in (fn.__doc__ or '')}
    assert 'flatten_swin_t' in docs and 'L2ViT_Tiny' in docs
    for name, doc in docs.items():
        path = re.search(r'\(see (\S+)\)', doc).group(1)
        assert os.path.isfile(os.path.join(ROOT, path)), (name, doc)
