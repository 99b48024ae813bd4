"""Parameter groups against the official optimizers (LeapLabTHU/FLatten-Transformer @ abdb115,
optimizer.py ``set_weight_decay_and_lr`` and each model's ``no_weight_decay``/``_keywords``), for all four
FLatten families; our extra exclusion behind TRAIN.OPTIMIZER.EXTRA_NO_WEIGHT_DECAY; fused optimizers."""
from __future__ import annotations

import os
import re

import pytest
import torch

from config import load_config
from models import build_model
from optimizer import build_optimizer, supports_found_inf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The official rule: no decay for 1-D parameters, names ending in '.bias', names in the model's
# no_weight_decay() and names containing one of its no_weight_decay_keywords(); one learning rate
# (no official FLatten model defines lower_lr_kvs). The lists, as the official model files return them:
OFFICIAL = {
    'flatten_swin_t': ({'absolute_pos_embed'}, {'relative_position_bias_table'}),
    'flatten_pvt_t': ({'cls_token'}, set()),
    'flatten_pvt_v2_b0': ({'pos_embed1', 'pos_embed2', 'pos_embed3', 'pos_embed4', 'cls_token'}, set()),
    'flatten_cswin_t': ({'pos_embed', 'cls_token'}, set()),
}
# Ours, off by default: the focused attention's scale and positional_encoding, PVT-v1's pos_embed1-4.
EXTRA = re.compile(r'(\.scale|\.positional_encoding|^stages\.\d\.pos_embed)$')   # PVT: state-dict pos_embed{i}


def official_no_decay(model: torch.nn.Module, skip: set, keywords: set) -> set:
    return {n for n, p in model.named_parameters()
            if len(p.shape) == 1 or n.endswith('.bias') or n in skip or any(k in n for k in keywords)}


def groups_by_name(opt: torch.optim.Optimizer, model: torch.nn.Module) -> tuple:
    names = {id(p): n for n, p in model.named_parameters()}
    return tuple({names[id(p)] for p in g['params']} for g in opt.param_groups)


@pytest.fixture(scope='module', params=sorted(OFFICIAL))
def family(request):
    config = load_config(os.path.join(ROOT, 'cfgs', f'{request.param}.yaml'), ['MODEL.NUM_CLASSES', '10'])
    return request.param, config, build_model(config)


def test_default_groups_are_the_official_ones(family):
    name, config, model = family
    opt = build_optimizer(config, model)
    assert len(opt.param_groups) == 2
    decay, no_decay = groups_by_name(opt, model)
    want = official_no_decay(model, *OFFICIAL[name])
    assert no_decay == want
    assert decay == {n for n, _ in model.named_parameters()} - want
    assert [g['weight_decay'] for g in opt.param_groups] == [config.TRAIN.WEIGHT_DECAY, 0.0]
    assert [g['lr'] for g in opt.param_groups] == [config.TRAIN.BASE_LR] * 2
    # the focused attention's scale / positional encodings are decayed, as officially
    attention = {n for n, _ in model.named_parameters() if n.endswith(('.scale', '.positional_encoding'))}
    assert attention and attention <= decay


def test_extra_exclusion_key(family):
    name, config, model = family
    config = load_config(os.path.join(ROOT, 'cfgs', f'{name}.yaml'),
                         ['MODEL.NUM_CLASSES', '10', 'TRAIN.OPTIMIZER.EXTRA_NO_WEIGHT_DECAY', 'True'])
    decay, no_decay = groups_by_name(build_optimizer(config, model), model)
    extra = {n for n, _ in model.named_parameters() if EXTRA.search(n)}
    assert no_decay == official_no_decay(model, *OFFICIAL[name]) | extra
    if name == 'flatten_pvt_t':
        assert {'stages.0.pos_embed', 'stages.3.pos_embed'} <= extra


def test_fused_on_cpu_and_found_inf_skips():
    config = load_config(os.path.join(ROOT, 'cfgs', 'flatten_swin_t.yaml'), ['TRAIN.OPTIMIZER.NAME', 'adamw'])
    model = torch.nn.Linear(3, 2)
    for name in ('adamw', 'sgd'):
        config.defrost()
        config.TRAIN.OPTIMIZER.NAME = name
        opt = build_optimizer(config, model)
        assert supports_found_inf(opt) and all(g['fused'] for g in opt.param_groups)
        model(torch.randn(4, 3)).sum().backward()
        before = [p.clone() for p in model.parameters()]
        opt.found_inf, opt.grad_scale = torch.ones(()), None
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        del opt.found_inf, opt.grad_scale
        opt.step()
        assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
