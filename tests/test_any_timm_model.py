"""Any registered timm model is a MODEL.TYPE, and a new family is one module.

* Stock timm baselines (resnet18 and timm's Swin-T shrunk through MODEL.KWARGS, convnext_atto) train on the
  embedded digits through main.py with one recipe file (only MODEL.TYPE / MODEL.KWARGS differ), learn well
  above chance (10 classes: 10%), and ``--eval --resume`` of the best checkpoint reproduces the logged
  accuracy exactly.
* An unknown name stops at config load with one line naming it and the closest registered names.
* The weight-decay groups of a stock timm model equal timm's own ``param_groups_weight_decay``.
* A family written as a single module (tests/fixtures/toy_family.py: model, timm registration, config section
  and adapter) trains, evaluates, is visualised and is benchmarked through the normal entry points.
"""
from __future__ import annotations

import glob
import os
import sys

import pytest
import torch

from harness import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')

# One recipe for every model (the demo's augmentation for digits; absolute learning rate).
RECIPE = """\
MODEL:
  NAME: {name}
  NUM_CLASSES: 10
  DROP_PATH_RATE: 0.0
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 16
  NUM_WORKERS: 0
TRAIN:
  EPOCHS: {epochs}
  WARMUP_EPOCHS: 0
  LR_SCALING: none
  BASE_LR: 2.0e-3
  MIN_LR: 1.0e-4
  KEEP_CHECKPOINTS: 1
AUG:
  HFLIP: 0.0
  SCALE: [0.5, 1.0]
  AUTO_AUGMENT: none
  COLOR_JITTER: 0.0
  REPROB: 0.0
  MIXUP: 0.0
  CUTMIX: 0.0
PRINT_FREQ: 100
SAVE_FREQ: 100
"""

SWIN_KWARGS = ['MODEL.KWARGS', '{embed_dim: 32, depths: [1, 1, 2, 1], num_heads: [1, 2, 4, 8], window_size: 4}']
BASELINES = {
    # BatchNorm from scratch: 2x lr, 4 epochs; one BasicBlock per stage (timm's ResNet takes ``layers``)
    'resnet18': ['TRAIN.BASE_LR', '4e-3', 'TRAIN.EPOCHS', '4', 'MODEL.KWARGS', '{layers: [1, 1, 1, 1]}'],
    'convnext_atto': [],
    'swin_tiny_patch4_window7_224': SWIN_KWARGS,
}


def recipe(tmp_path, name: str, epochs: int = 4) -> str:
    path = os.path.join(str(tmp_path), f'{name}.yaml')
    with open(path, 'w') as f:
        f.write(RECIPE.format(name=name, epochs=epochs))
    return path


def train(cfg: str, data: str, out: str, *opts: str):
    return run_main(['--cfg', cfg, '--data-path', data, '--output', out, '--device', 'cpu',
                     '--opts', *opts]).ok()


def eval_resume(cfg: str, data: str, out: str, checkpoint: str, *opts: str):
    return run_main(['--cfg', cfg, '--data-path', data, '--output', out, '--tag', 'eval', '--device', 'cpu',
                     '--eval', '--resume', checkpoint, '--opts', *opts]).ok()


@pytest.mark.slow
@pytest.mark.parametrize('model_type', sorted(BASELINES))
def test_stock_timm_model_trains_and_reevaluates(model_type, digits, tmp_path):
    opts = ['MODEL.TYPE', model_type, *BASELINES[model_type]]
    cfg = recipe(tmp_path, 'baseline', epochs=2)
    run = train(cfg, digits, str(tmp_path / 'out'), *opts)
    assert type(run.result.model).__module__.startswith('timm.models.'), type(run.result.model)
    best = run.summary['best']['acc1']
    assert best >= 40.0, f'{model_type}: best val Acc@1 {best}% (chance is 10%)'
    logged = [r['val_acc1'] for r in run.metrics]
    assert max(logged) == best
    again = eval_resume(cfg, digits, str(tmp_path / 'out'), run.path('max_acc.pth'), *opts)
    assert again.result.eval.acc1 == best, (again.result.eval.acc1, best)


def test_unknown_model_type_is_one_line_with_suggestions(tmp_path, digits):
    cfg = recipe(tmp_path, 'bad')
    run = run_main(['--cfg', cfg, '--data-path', digits, '--output', str(tmp_path / 'o'), '--device', 'cpu',
                    '--opts', 'MODEL.TYPE', 'resnet1_8'])
    line = run.error_line()
    assert "'resnet1_8'" in line and 'resnet18' in line and 'timm.list_models()' in line
    assert not os.path.exists(tmp_path / 'o'), 'an unknown MODEL.TYPE must stop before any work'


def test_stock_timm_model_weight_decay_groups_follow_timm(tmp_path):
    from timm.optim import param_groups_weight_decay
    from config import load_config
    from models import build_model
    from optimizer import build_optimizer

    for model_type in ('convnext_atto', 'vit_tiny_patch16_224'):
        size = '224' if model_type.startswith('vit') else '32'
        config = load_config(recipe(tmp_path, 'wd'), ['MODEL.TYPE', model_type, 'DATA.IMG_SIZE', size])
        model = build_model(config)
        ours = build_optimizer(config, model).param_groups
        theirs = param_groups_weight_decay(model, weight_decay=config.TRAIN.WEIGHT_DECAY, no_weight_decay_list=(
            model.no_weight_decay() if hasattr(model, 'no_weight_decay') else ()))
        by_decay = lambda groups, wd: {id(p) for g in groups if g['weight_decay'] == wd for p in g['params']}
        assert by_decay(ours, 0.0) == by_decay(theirs, 0.0), model_type
        assert by_decay(ours, config.TRAIN.WEIGHT_DECAY) == by_decay(theirs, config.TRAIN.WEIGHT_DECAY), model_type
        assert by_decay(ours, 0.0) and by_decay(ours, config.TRAIN.WEIGHT_DECAY)


def test_model_kwargs_pass_through_and_are_named_in_errors(tmp_path):
    from config import ConfigError, load_config
    from models import build_model

    cfg = recipe(tmp_path, 'kw')
    model = build_model(load_config(cfg, ['MODEL.TYPE', 'swin_tiny_patch4_window7_224', *SWIN_KWARGS]))
    assert model.embed_dim == 32 and [len(layer.blocks) for layer in model.layers] == [1, 1, 2, 1]
    assert model.patch_embed.img_size == (32, 32)          # DATA.IMG_SIZE reached img_size
    model = build_model(load_config(cfg, ['MODEL.TYPE', 'resnet18', 'MODEL.NUM_CLASSES', '7']))
    assert model.fc.out_features == 7                      # a model without img_size still builds
    with pytest.raises(ConfigError, match=r'MODEL\.KWARGS\.bogus_arg'):
        build_model(load_config(cfg, ['MODEL.TYPE', 'resnet18', 'MODEL.KWARGS', '{bogus_arg: 1}']))
    with pytest.raises(ConfigError, match=r'MODEL\.SWIN\.EMBED_DIM'):   # a family key the stock model ignores
        load_config(cfg, ['MODEL.TYPE', 'resnet18', 'MODEL.SWIN.EMBED_DIM', '64'])


# ----------------------------------------------------------------------------- a family in one module
@pytest.fixture(scope='module')
def toy_family():
    sys.path.insert(0, FIXTURES)
    try:
        import toy_family
    finally:
        sys.path.remove(FIXTURES)
    return toy_family


@pytest.mark.slow
def test_one_module_family_through_every_entry_point(toy_family, digits, tmp_path):
    from config import ConfigError, load_config

    cfg = recipe(tmp_path, 'toy', epochs=3)
    opts = ['MODEL.TYPE', 'ToyViT', 'MODEL.TOY.EMBED_DIM', '48', 'MODEL.TOY.NUM_HEADS', '3']
    # its config section and checks work like a built-in family's
    assert load_config(cfg, opts).MODEL.TOY.DEPTH == 2
    with pytest.raises(ConfigError, match=r'MODEL\.TOY\.DEPTH must be positive'):
        load_config(cfg, opts + ['MODEL.TOY.DEPTH', '0'])
    with pytest.raises(ConfigError, match=r'MODEL\.TOY\.NUM_HEADS'):       # the model's ValueError, mapped
        from models import build_model
        build_model(load_config(cfg, ['MODEL.TYPE', 'ToyViT', 'MODEL.TOY.NUM_HEADS', '5']))
    with pytest.raises(ConfigError, match=r'MODEL\.TOY\.EMBED_DIM'):        # read by ToyViT only
        load_config(cfg, ['MODEL.TOY.EMBED_DIM', '48'])

    # train + evaluate through main.py
    run = train(cfg, digits, str(tmp_path / 'out'), *opts)
    assert isinstance(run.result.model, toy_family.ToyViT)
    best = run.summary['best']['acc1']
    assert best >= 30.0, f'ToyViT: best val Acc@1 {best}% (chance is 10%)'
    again = eval_resume(cfg, digits, str(tmp_path / 'out'), run.path('max_acc.pth'), *opts)
    assert again.result.eval.acc1 == best

    # visualise its attention (softmax tap, whole-grid layout read off the model)
    from visualize.cli import main as visualize
    image = sorted(glob.glob(os.path.join(digits, 'val', '3', '*.png')))[0]
    out = str(tmp_path / 'vis')
    assert visualize(['--cfg', cfg, '--opts', *opts, '--checkpoint', run.path('max_acc.pth'), '--image', image,
                      '--stage', '0', '--block', '1', '--output', out, '--size', '64', '--query-stride', '4']) == 0
    pngs = glob.glob(os.path.join(out, 'blocks.1.attn_*.png'))
    assert pngs, os.listdir(out)

    # benchmark it
    from tools import benchmark
    result = benchmark.main(['--cfgs', cfg, '--opts', *opts, '--device', 'cpu', '--batch', '2', '--warmup', '0',
                             '--repeats', '1', '--threads', '1', '--json', str(tmp_path / 'bench.json')])
    assert os.path.isfile(tmp_path / 'bench.json'), result
