"""``--reference DIR``: the official model, built by a user's checkout of an official repository (Swin-Transformer
codebase layout: ``config.py`` with ``_C``, ``models.build_model``, ``cfgs/<name>.yaml``) in a subprocess that
loads OUR weights (strict) and measures on request, so that rounds alternate between the two sides. Nothing
of the official code is copied here."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Sequence

import torch
import torch.nn as nn

from errors import ConfigError, UserError
from tools.bench.timing import measure

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY = os.path.join(ROOT, 'tools', 'benchmark.py')
WORKER_FLAG = '--official-worker'


def _install_timm_shims() -> None:
    """Old timm import paths the official code uses, aliased to timm 1.x modules when they are missing."""
    import importlib
    import timm
    for old, new in (('timm.models.layers', 'timm.layers'), ('timm.models.registry', 'timm.models'),
                     ('timm.models.helpers', 'timm.models')):
        try:
            importlib.import_module(old)
        except ImportError:
            sys.modules[old] = importlib.import_module(new)
    _ = timm


def build_official(ref_dir: str, cfg_name: str, img_size: int, num_classes: int) -> nn.Module:
    """The official model for ``cfg_name`` (a file of DIR/cfgs), built with the official config and builder."""
    # the checkout's config.py and models/ must win over ours: it alone, before the interpreter's own path
    # (this repository and tools/ dropped: nothing of ours is imported by name from here on)
    sys.path[:] = [ref_dir] + [p for p in sys.path if os.path.realpath(p or '.') not in
                               (os.path.realpath(ROOT), os.path.realpath(os.path.join(ROOT, 'tools')))]
    _install_timm_shims()
    import config as official_config          # DIR/config.py
    from models import build_model as official_build
    cfg = official_config._C.clone()
    cfg.defrost()
    cfg.merge_from_file(os.path.join(ref_dir, 'cfgs', cfg_name))
    cfg.DATA.IMG_SIZE = img_size
    cfg.MODEL.NUM_CLASSES = num_classes
    cfg.freeze()
    return official_build(cfg)


def official_worker(argv: List[str]) -> None:
    """Subprocess side of ``--reference``: build, load weights, then answer 'measure' lines on stdin."""
    spec = json.loads(argv[0])
    proto = os.fdopen(os.dup(1), 'w')
    sys.stdout = sys.stderr                   # the official code prints while building
    torch.set_num_threads(spec['threads'])
    with contextlib.redirect_stdout(io.StringIO()):
        model = build_official(spec['ref_dir'], spec['cfg_name'], spec['opts']['img_size'],
                               spec['opts']['num_classes'])
        model.load_state_dict(torch.load(spec['weights'], map_location='cpu', weights_only=True), strict=True)
    proto.write(json.dumps({'ready': True}) + '\n')
    proto.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get('quit'):
            break
        with contextlib.redirect_stdout(io.StringIO()):
            res = measure(model, spec['opts'], cmd['modes'])
        proto.write(json.dumps(res) + '\n')
        proto.flush()


def official_cfg_name(ref_dir: str, cfg_path: str) -> str:
    """The official config of the same name as ours; a one-line error when the checkout lacks it."""
    cfg_name = os.path.basename(cfg_path)
    if not os.path.isfile(os.path.join(ref_dir, 'cfgs', cfg_name)):
        raise ConfigError(f'--reference {ref_dir}: no cfgs/{cfg_name} there; pass the root of the official '
                         f'checkout (e.g. LeapLabTHU/FLatten-Transformer) and a config it ships')
    return cfg_name


class OfficialProcess:
    """The official model in a subprocess that measures on request (so rounds alternate)."""

    def __init__(self, ref_dir: str, cfg_path: str, model: nn.Module, opts: Dict[str, Any]) -> None:
        cfg_name = official_cfg_name(ref_dir, cfg_path)
        self.tmp = tempfile.TemporaryDirectory()
        weights = os.path.join(self.tmp.name, 'weights.pth')
        torch.save(model.state_dict(), weights)
        spec = {'ref_dir': os.path.abspath(ref_dir), 'cfg_name': cfg_name, 'weights': weights, 'opts': opts,
                'device': opts['device'], 'threads': torch.get_num_threads()}
        # the official checkout's config.py / models/ must win over ours: drop this repository from the path,
        # keep the rest (a --target site of carried wheels, say)
        keep = [d for d in os.environ.get('PYTHONPATH', '').split(os.pathsep)
                if d and os.path.realpath(d) != os.path.realpath(ROOT)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(keep))
        self.proc = subprocess.Popen([sys.executable, ENTRY, WORKER_FLAG, json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=self.tmp.name)
        ready = self.proc.stdout.readline()
        if not ready:
            raise UserError('--reference: the official model failed to build or load our weights '
                            '(its error is printed above)')

    def measure(self, modes: Sequence[str]) -> Dict[str, Dict[str, float]]:
        self.proc.stdin.write(json.dumps({'modes': list(modes)}) + '\n')
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise UserError('--reference: the official worker died (see its error above)')
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(json.dumps({'quit': True}) + '\n')
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.tmp.cleanup()
