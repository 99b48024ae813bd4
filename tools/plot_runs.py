"""Training curves of one or several runs in one figure: train loss, val Acc@1 and learning rate per epoch.

    python tools/plot_runs.py RUN_DIR [RUN_DIR ...] -o curves.png
    python tools/plot_runs.py output/flatten_swin_digits/L output/flatten_swin_digits/S -o docs/curves.png

A RUN_DIR is a training output folder (``<output>/<MODEL.NAME>/<TAG>``) holding ``metrics.jsonl`` (a path
to the file itself works too). Each run's legend entry is ``MODEL.NAME/TAG`` from its ``config.yaml``
(the folder's last two components without one), or the ``--labels`` given. With ``--ema`` the EMA's
Acc@1 is drawn too (dashed), for runs that have it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

if __name__ == '__main__' and not __package__:   # run as a file: tools/_root.py puts the repository root on the path
    import _root  # noqa: F401

import errors  # noqa: E402
from errors import ConfigError, DataError  # noqa: E402
from logger import METRICS_FILE, read_metrics  # noqa: E402

PANELS = (('train_loss', 'train loss'), ('val_acc1', 'val Acc@1 (%)'), ('lr', 'learning rate'))
log = logging.getLogger('plot_runs')


def epoch_records(path: str) -> List[Dict]:
    """The run's per-epoch records, one per epoch (the last one written wins), sorted by epoch. A line that
    is valid JSON but not an object (not a record) is skipped with a warning."""
    by_epoch: Dict[int, Dict] = {}
    others = []
    try:
        records = read_metrics(path)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f'{path}: cannot read its {METRICS_FILE} ({errors.one_line(e)})') from None
    for rec in records:
        if not isinstance(rec, dict):
            others.append(rec)
        elif rec.get('kind') == 'epoch' and isinstance(rec.get('epoch'), int):
            by_epoch[rec['epoch']] = rec
    if others:
        log.warning('%s: skipped %d line(s) that are not JSON objects (first: %.60r)', path, len(others), others[0])
    return [by_epoch[e] for e in sorted(by_epoch)]


def run_label(path: str) -> str:
    """``MODEL.NAME/TAG`` from the run's config.yaml, else the folder's last two path components."""
    folder = os.path.dirname(path) if path.endswith('.jsonl') else path
    cfg = os.path.join(folder, 'config.yaml')
    if os.path.isfile(cfg):
        import yaml
        try:
            with open(cfg) as f:
                data = yaml.safe_load(f)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = None                           # an unreadable config only costs the nicer label
        if isinstance(data, dict) and isinstance(data.get('MODEL'), dict):
            name, tag = data['MODEL'].get('NAME'), data.get('TAG')
            if name and tag:
                return f'{name}/{tag}'
    parts = os.path.normpath(os.path.abspath(folder)).split(os.sep)
    return '/'.join(parts[-2:])


def run_labels(paths: Sequence[str]) -> List[str]:
    """:func:`run_label` of each run; runs that share one (same MODEL.NAME and TAG) are told apart by their
    folder paths without the part they have in common at the end (e.g. ``flatten_swin_t/default (a)`` and
    ``flatten_swin_t/default (b)`` for a/output/... and b/output/...)."""
    labels = [run_label(p) for p in paths]
    folders = [os.path.normpath(os.path.abspath(os.path.dirname(p) if p.endswith('.jsonl') else p)).split(os.sep)
               for p in paths]
    for label in set(labels):
        same = [i for i, x in enumerate(labels) if x == label]
        if len(same) < 2:
            continue
        common = 0                          # length of the path tail all of them share
        while all(len(folders[i]) > common + 1 for i in same) and \
                len({folders[i][-common - 1] for i in same}) == 1:
            common += 1
        heads = [folders[i][:len(folders[i]) - common] for i in same]
        for depth in range(1, max(len(h) for h in heads) + 1):
            tails = ['/'.join(h[-depth:]) for h in heads]
            if len(set(tails)) == len(tails):
                break
        else:
            tails = [str(n + 1) for n in range(len(same))]
        for i, tail in zip(same, tails):
            labels[i] = f'{label} ({tail})'
    return labels


def plot_runs(paths: Sequence[str], output: str, labels: Optional[Sequence[str]] = None, ema: bool = False,
              title: Optional[str] = None):
    """Draw the figure and save it to ``output``; returns the matplotlib Figure (three Axes)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    if labels is not None and len(labels) != len(paths):
        raise ConfigError(f'{len(labels)} --labels for {len(paths)} runs: give one label per run, or none')
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.8))
    labels = list(labels) if labels is not None else run_labels(paths)
    for i, path in enumerate(paths):
        if not os.path.exists(path if path.endswith('.jsonl') else os.path.join(path, METRICS_FILE)):
            raise DataError(f'no {METRICS_FILE} in {path}: give the output folder of a training run')
        records = epoch_records(path)
        if not records:
            raise DataError(f'{path} has no epoch records yet: plot it once the run has finished an epoch')
        label = labels[i]
        epochs = [r['epoch'] for r in records]
        colour = f'C{i % 10}'
        for ax, (key, _) in zip(axes, PANELS):
            ax.plot(epochs, [r.get(key) if r.get(key) is not None else float('nan') for r in records],
                    marker='o', markersize=3, color=colour, label=label)
        if ema and any(r.get('ema_acc1') is not None for r in records):
            axes[1].plot(epochs, [r.get('ema_acc1', float('nan')) for r in records], linestyle='--',
                         color=colour, label=f'{label} (EMA)')
    for ax, (key, name) in zip(axes, PANELS):
        ax.set_xlabel('epoch')
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if key == 'lr':
            ax.ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        fig.savefig(output, dpi=120)
    except (OSError, ValueError) as e:            # unwritable folder, unknown image extension
        plt.close(fig)
        raise ConfigError(f'-o {output}: cannot write the figure ({errors.one_line(e)}); '
                          'give a writable .png path') from None
    return fig


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('runs', nargs='+', help='run output folders (or their metrics.jsonl)')
    p.add_argument('-o', '--output', default='curves.png', help='PNG to write (default: curves.png)')
    p.add_argument('--labels', nargs='+', help='legend entries, one per run (default: MODEL.NAME/TAG)')
    p.add_argument('--ema', action='store_true', help="also draw the EMA's val Acc@1 (dashed)")
    p.add_argument('--title', help='figure title')
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='warning: %(message)s')
    plot_runs(args.runs, args.output, args.labels, args.ema, args.title)
    print(f'wrote {args.output}')
    return 0


if __name__ == '__main__':
    sys.exit(errors.cli(main))      # a bad folder, file or -o is one line and exit 2
