"""``--sweep-resolution``: inference time and memory per image against the token count of each config, from
its base size up to 4x the pixels (or at --img-size)."""
from __future__ import annotations

import os
from typing import Any, Dict, List

from tools.bench import timing
from tools.bench.classify import row_opts
from tools.bench.configs import build, load_cfg, num_classes


def run_sweep(args) -> List[Dict[str, Any]]:
    """Time and memory per image vs token count for each config, from the base size up to 4x the pixels."""
    rows = []
    for cfg_path in args.cfgs:
        base = load_cfg(cfg_path, None, args.opts).DATA.IMG_SIZE
        sizes = args.img_size or [base, int(round(base * 2 ** 0.5 / 32)) * 32, 2 * base]
        for size in sizes:
            config = load_cfg(cfg_path, size, args.opts)
            model = build(config)
            res = timing.measure(model, row_opts(args, size, num_classes(model, config)), ['infer'])['infer']
            rows.append({'cfg': os.path.basename(cfg_path), 'img_size': size, 'tokens_stage1': (size // 4) ** 2,
                         'ms_per_img': 1e3 * res['wall_s'] / args.batch,
                         'cpu_ms_per_img': 1e3 * res['cpu_s_per_img'], 'peak_mb': res['peak_mb']})
            del model
    for r in rows:
        first = next(x for x in rows if x['cfg'] == r['cfg'])
        r['time_growth'] = r['ms_per_img'] / first['ms_per_img']
        r['token_growth'] = r['tokens_stage1'] / first['tokens_stage1']
    return rows


def print_sweep(rows: List[Dict[str, Any]]) -> None:
    """The sweep as a markdown table."""
    print('| config | res | stage-1 tokens | x tokens | ms/img | x time | CPU ms/img | peak MiB |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        print(f"| {r['cfg']} | {r['img_size']} | {r['tokens_stage1']} | {r['token_growth']:.2f} | "
              f"{r['ms_per_img']:.1f} | {r['time_growth']:.2f} | {r['cpu_ms_per_img']:.1f} | {r['peak_mb']:.0f} |")