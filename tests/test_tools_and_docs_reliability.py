"""What the README says about repeated augmentation is what the sampler does; tools/plot_runs.py skips a
metrics line that is JSON but not a record, with a warning."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))

import plot_runs  # noqa: E402
from data.samplers import RepeatedAugSampler  # noqa: E402


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
