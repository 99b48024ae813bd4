"""``--data PATH``: images/s of the training input pipeline alone (decode + augment + collate) per worker
count, on a dataset in the ImageNet folder layout."""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List

from tools.bench.configs import load_cfg


def run_data(args) -> List[Dict[str, Any]]:
    """Images/s of the training input pipeline alone (decode + augment + collate, N workers)."""
    from data.build import build_train_loader, patch_randaugment_posterize
    patch_randaugment_posterize()          # as runner.run does: RandAugment 'inc1' under Pillow >= 12
    rows = []
    for cfg_path in args.cfgs:
        for workers in args.workers:
            config = load_cfg(cfg_path, None, list(args.opts) + [
                'DATA.DATA_PATH', args.data, 'DATA.BATCH_SIZE', str(args.batch), 'DATA.NUM_WORKERS', str(workers)])
            _, loader, _ = build_train_loader(config)
            it = iter(loader)
            for _ in range(min(args.warmup, 2)):
                next(it)
            t0, n = time.perf_counter(), 0
            for _ in range(args.data_batches):
                try:
                    images, _, _ = next(it)
                except StopIteration:
                    break
                n += images.shape[0]
            dt = time.perf_counter() - t0
            rows.append({'cfg': os.path.basename(cfg_path), 'workers': workers, 'images': n, 'img_s': n / dt,
                         'img_size': config.DATA.IMG_SIZE})
            del it, loader
    return rows


def print_data(rows: List[Dict[str, Any]]) -> None:
    """The pipeline rates as a markdown table."""
    print('| config | res | workers | images | pipeline img/s |')
    print('|---|---:|---:|---:|---:|')
    for r in rows:
        print(f"| {r['cfg']} | {r['img_size']} | {r['workers']} | {r['images']} | {r['img_s']:.1f} |")
