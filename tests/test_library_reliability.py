"""The model library as a demanding user meets it: timm's ``global_pool`` on every family's head, pretrained
files at another input size or of another model, Visformer's input-size error, and a bad implementation
choice in the environment (one line from every tool). Tiny models, CPU, in-process except where the point
is a tool's exit code and stderr."""
import os
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import models  # noqa: F401  (registers the families)
from errors import CheckpointError, ConfigError
from models.impl_choice import ImplChoice
from our_registry import family_reps, tiny_input_size, tiny_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one tiny model per family, off the registry (tests/our_registry.py); forward_features is laid out as the
# model's timm ``output_fmt`` says (timm's default: NCHW)
FAMILIES = family_reps()
POSITION_DIMS = {'NLC': (1,), 'NHWC': (1, 2), 'NCHW': (2, 3)}


def tiny(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, **dict(tiny_kwargs(name), **kwargs))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + p)
    return model


# ----------------------------------------------------------------------------- global_pool
def reference_head(features: torch.Tensor, head: torch.nn.Linear, pool: str, fmt: str) -> torch.Tensor:
    """timm's pooling written out: the mean / max / (mean + max) / 2 over the positions, then the linear head;
    '' applies the head at every position (channels-first maps keep their layout: (B, classes, H, W))."""
    x = features.double()
    dims = POSITION_DIMS[fmt]
    w, b = head.weight.double(), head.bias.double()
    if pool == '':
        if fmt == 'NCHW':
            return torch.einsum('bchw,kc->bkhw', x, w) + b[:, None, None]
        return x @ w.T + b
    avg, mx = x.mean(dim=dims), x.amax(dim=dims)
    pooled = {'avg': avg, 'max': mx, 'avgmax': (avg + mx) / 2}[pool]
    return pooled @ w.T + b


@pytest.mark.parametrize('name', FAMILIES)
def test_global_pool_is_timms_on_every_family(name):
    side = tiny_input_size(name)
    model = randomize_(tiny(name, num_classes=5, global_pool='max')).eval()
    if isinstance(model, VisionTransformer):       # a timm ViT subclass pools with timm's own ViT code
        assert type(model).forward_head is VisionTransformer.forward_head and type(model).pool is VisionTransformer.pool
        return
    fmt = getattr(model, 'output_fmt', 'NCHW')
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model(x).double(), reference_head(features, model.get_classifier(), 'max', fmt),
                                   rtol=1e-4, atol=1e-5)
        for pool in ('avg', 'avgmax', ''):
            model.reset_classifier(3, pool)
            randomize_(model.get_classifier(), seed=2)
            # float32 sums of large random features: 1e-4 relative (a wrong pooling is off by O(1))
            torch.testing.assert_close(model.forward_head(features).double(),
                                       reference_head(features, model.get_classifier(), pool, fmt),
                                       rtol=1e-4, atol=1e-5)
        # unpooled without a classifier: forward returns forward_features' layout (timm's contract)
        model.reset_classifier(0, '')
        assert torch.equal(model(x), features)


@pytest.mark.parametrize('name', FAMILIES)
def test_unsupported_global_pool_is_a_value_error_naming_it(name):
    if issubclass(type(tiny(name)), VisionTransformer):      # timm's ViT pooling: 'token' is one of its choices
        with pytest.raises((ValueError, AssertionError)):
            tiny(name, global_pool='catavgmax')
        return
    with pytest.raises(ValueError, match=r"global_pool='token' is not supported .*'avg', 'max', 'avgmax' or ''"):
        tiny(name, global_pool='token')
    model = tiny(name, num_classes=3)
    with pytest.raises(ValueError, match="global_pool='catavgmax'"):
        model.reset_classifier(7, 'catavgmax')
    assert model.global_pool == 'avg' and model.num_classes == 3      # a refused reset changes nothing


# ----------------------------------------------------------------------------- position tables
def bicubic_map(pos: torch.Tensor, size) -> torch.Tensor:
    """(1, C, h, w) -> (1, C, *size): the official fine-tuning resize."""
    return F.interpolate(pos.float(), size=size, mode='bicubic', align_corners=False)


def bicubic_tokens(pos: torch.Tensor, old, new) -> torch.Tensor:
    """(1, h*w, C) row-major tokens -> (1, H*W, C), through the same resize of the (1, C, h, w) map."""
    grid = pos.transpose(1, 2).reshape(1, -1, *old)
    return bicubic_map(grid, new).flatten(2).transpose(1, 2)


def bicubic_rel_table(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """((2w-1)^2, heads) -> ((2w'-1)^2, heads), head by head."""
    s, r = round(table.shape[0] ** 0.5), round(new_len ** 0.5)
    return torch.stack([bicubic_map(table[:, h].reshape(1, 1, s, s), (r, r)).reshape(-1)
                        for h in range(table.shape[1])], 1)


def save(model: torch.nn.Module, path: str) -> dict:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({'model': sd}, path)
    return sd


@pytest.mark.parametrize('name, src_size, dst_size', [('official_visformer_tiny', 64, 96),
                                                      ('swin_visformer_tiny_v2', 64, 96),
                                                      ('swin_visformer_tiny_v2', 224, 448)])
def test_visformer_pretrained_at_another_size_resamples_position_tables(tmp_path, name, src_size, dst_size):
    """timm's pretrained path, strict (same class count): position embeddings resampled, v2 bias tables
    resized, the shift masks the new size needs re-created; every other tensor as saved."""
    path = str(tmp_path / 'src.pth')
    own_windows = {k: v for k, v in tiny_kwargs(name).items() if k != 'window_sizes'}   # the variant's: clamped

    def build(size: int, **kwargs) -> torch.nn.Module:
        return timm.create_model(name, **dict(own_windows, img_size=size, **kwargs))
    sd = save(randomize_(build(src_size)), path)
    dst = build(dst_size, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    fresh = build(dst_size)
    resampled = 0
    for k, v in dst.state_dict().items():
        if k.startswith('pos_embed'):
            torch.testing.assert_close(v, bicubic_map(sd[k], v.shape[-2:]), rtol=1e-5, atol=1e-6)
            resampled += 1
        elif k.endswith('relative_position_bias_table') and sd[k].shape != v.shape:
            torch.testing.assert_close(v, bicubic_rel_table(sd[k], v.shape[0]), rtol=1e-5, atol=1e-6)
            resampled += 1
        elif k.endswith(('attn_mask', 'relative_position_index')):
            assert torch.equal(v, fresh.state_dict()[k]), k
        else:
            assert torch.equal(v, sd[k]), k
    assert resampled >= len(dst.stage_ids)
    if src_size == 224:          # 448 tiles the v2 windows: shifted blocks, masks the 224 file has not
        assert any(k.endswith('attn_mask') for k in dst.state_dict()) and not any(k.endswith('attn_mask') for k in sd)
    with torch.no_grad():
        assert dst.eval()(torch.randn(1, 3, dst_size, dst_size)).shape == (1, 1000)


def test_visformer_finetune_load_at_another_size(tmp_path):
    """--pretrained (the experiment layer's loader) takes a 64 px Visformer checkpoint at DATA.IMG_SIZE 96."""
    from resume import load_finetune_weights
    path = str(tmp_path / 'v1.pth')
    sd = save(randomize_(tiny('official_visformer_tiny', img_size=64, num_classes=10)), path)
    model = tiny('official_visformer_tiny', img_size=96, num_classes=10)
    load_finetune_weights(model, path)
    torch.testing.assert_close(model.state_dict()['pos_embed1'], bicubic_map(sd['pos_embed1'], (12, 12)), rtol=1e-5, atol=1e-6)


def test_pvt_pretrained_at_another_size_resamples_position_tables(tmp_path):
    path = str(tmp_path / 'pvt.pth')
    sd = save(randomize_(tiny('flatten_pvt_t')), path)
    dst = tiny('flatten_pvt_t', img_size=128, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    for i, side in enumerate((16, 8, 4, 2)):
        k = f'pos_embed{i + 1}'
        torch.testing.assert_close(dst.state_dict()[k], bicubic_tokens(sd[k], (side, side), (2 * side, 2 * side)),
                                   rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- a file of another model
def test_pretrained_file_of_another_model_is_refused(tmp_path):
    path = str(tmp_path / 'dat.pth')
    save(tiny('dat_tiny'), path)
    with pytest.raises(CheckpointError, match=r'does not fit FLattenPVTv2: it has 0 of the model') as e:
        timm.create_model('flatten_pvt_v2_b0', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                          num_classes=10, **tiny_kwargs('flatten_pvt_v2_b0'))
    assert '\n' not in str(e.value)


@pytest.mark.parametrize('name', FAMILIES)
def test_every_family_filter_refuses_a_foreign_state_dict(name):
    module = sys.modules[type(tiny(name)).__module__]
    model = tiny(name)
    foreign = {'backbone.conv1.weight': torch.zeros(3), 'fc.weight': torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match='does not fit'):
        module.checkpoint_filter_fn({'model': foreign}, model)
    own = {'model': model.state_dict()}
    model.load_state_dict(module.checkpoint_filter_fn(own, model), strict=True)      # its own file: as before


def test_missing_or_non_checkpoint_pretrained_file_is_one_line(tmp_path):
    missing = str(tmp_path / 'nope.pth')
    with pytest.raises(CheckpointError, match=r"pretrained file '.*nope\.pth' for flatten_pvt_t does not exist"):
        tiny('flatten_pvt_t', pretrained=True, pretrained_cfg_overlay=dict(file=missing))
    text = tmp_path / 'weights.pth'
    text.write_text('these are not weights\n')
    with pytest.raises(CheckpointError, match='is not a PyTorch checkpoint'):
        tiny('flatten_pvt_t', pretrained=True, pretrained_cfg_overlay=dict(file=str(text)))


# ----------------------------------------------------------------------------- Visformer input size
def test_visformer_size_error_names_the_image_size_and_its_advice_works():
    model = tiny('official_visformer_tiny', num_classes=3).eval()
    with pytest.raises(ValueError, match=r'input size \(97, 131\) does not match the model \(64, 64\).*'
                                         r'dynamic_img_size=True'):
        model(torch.randn(1, 3, 97, 131))
    with pytest.raises(ValueError, match='dynamic_img_size=True'):
        tiny('official_visformer_tiny', img_size=(97, 131))
    advised = tiny('official_visformer_tiny', num_classes=3, dynamic_img_size=True).eval()
    with torch.no_grad():
        assert advised(torch.randn(1, 3, 97, 131)).shape == (1, 3)


# ----------------------------------------------------------------------------- implementation choice
def test_empty_implementation_choice_is_the_default(monkeypatch):
    monkeypatch.setenv('SOME_IMPL', '')
    assert ImplChoice('thing', ('a', 'b'), 'SOME_IMPL', 'b').name == 'b'
    monkeypatch.setenv('SOME_IMPL', ' a ')
    assert ImplChoice('thing', ('a', 'b'), 'SOME_IMPL', 'b').name == 'a'
    monkeypatch.setenv('SOME_IMPL', 'bogus')
    with pytest.raises(ConfigError, match=r"^SOME_IMPL='bogus' is unknown; use one of a, b$"):
        ImplChoice('thing', ('a', 'b'), 'SOME_IMPL', 'b')


@pytest.mark.slow
@pytest.mark.parametrize('env, command', [
    ('FLATTEN_ATTENTION_IMPL', ['-m', 'visualize', '--cfg', 'cfgs/demo/dat_digits.yaml', '--list']),
    ('DAT_NEIGHBORHOOD_IMPL', ['tools/model_stats.py', '--no-flops', 'cfgs/flatten_pvt_t.yaml']),
    ('FLATTEN_ATTENTION_IMPL', ['tools/benchmark.py', '--check']),
])
def test_bad_implementation_choice_is_one_line_from_every_tool(env, command, startup_server):
    run = startup_server.run(command, {env: 'bogus'})       # a fresh start of the tool, past torch and timm
    assert run.code == 2, run.err
    assert run.err.strip().splitlines() == [f"ERROR: {env}='bogus' is unknown; use one of "
                                               f"{'torch, natten' if env.startswith('DAT') else 'reference, fast, triton'}"]
