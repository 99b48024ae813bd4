"""Dense prediction: every family as a timm feature backbone at any input size (``features_only=True,
dynamic_img_size=True``), under segmentation_models_pytorch (UPerNet, FPN) and torchvision's detectors
(Faster / Mask R-CNN over ``dense.FeaturePyramidBackbone``); classification checkpoints into feature backbones
at another size; gradient checkpointing in feature mode; a short segmentation fine-tune on digit scenes.

Models are the registered variants shrunk through kwargs (widths 8-128, 1-2 blocks per stage) so the file
stays fast; references are independent: stride arithmetic of each family's convolutions, F.interpolate
written here, models built natively at the other size, the real smp / torchvision models.
"""
import logging
import math

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import models  # noqa: F401  (registers the families in timm)
from checkpoint import save_checkpoint
from dense import FeaturePyramidBackbone
from our_registry import feature_reductions, module_of, pyramid_reps, tiny_kwargs

# the families, off the registry (tests/our_registry.py): one tiny variant per family whose feature maps form a
# pyramid, and the Swin softmax baseline (its windows pad)
NAMES = pyramid_reps() + ['flatten_swin_t_softmax']
# dense sizes per family module: the default patches (stride-4 stems: the stride arithmetic below) and two
# blocks where the resampling checks read a second block's tables; a family without an entry is shrunk as in
# every other test (our_registry.tiny_kwargs, its input size left to dynamic_img_size)
DENSE_SHRINK = {
    'models.flatten_swin': dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
    'models.flatten_pvt': dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), mlp_ratios=(2, 2, 2, 2),
                               depths=(1, 1, 1, 1)),
    'models.flatten_pvt_v2': dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), mlp_ratios=(2, 2, 2, 2),
                                  depths=(1, 1, 1, 1)),
    'models.flatten_cswin': dict(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8)),
    'models.dat': dict(dim_stem=16, dims=(16, 32, 64, 128), heads=(1, 2, 4, 8), groups=(1, 1, 2, 4),
                       depths=(2, 2, 2, 2), stage_spec=(('N', 'D'),) * 4),
    'models.l2vit': dict(dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(2, 2, 2, 2)),
    'models.visformer': lambda name: (
        dict(init_channels=8, embed_dim=32, depths=(1, 2, 2), num_heads=2) if name.startswith('official_') else
        dict(init_channels=8, embed_dim=32, depths=(1, 1, 2, 2), num_heads=(1, 1, 2, 2))),
}


def dense_kwargs(name: str) -> dict:
    """The kwargs that shrink ``name`` for the dense checks (no img_size: each check picks its input size)."""
    shrink = DENSE_SHRINK.get(module_of(name)) or tiny_kwargs(name)
    kwargs = shrink(name) if callable(shrink) else shrink
    return {k: v for k, v in kwargs.items() if k != 'img_size'}


TINY = {name: dense_kwargs(name) for name in NAMES}
FOUR_STAGE = [n for n in NAMES if len(feature_reductions(n)) == 4]   # strides 4..32: smp's transformer layout
SIZES = [(99, 170), (150, 115)]           # non-square, divisible by neither the patch (4) nor a window (7)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Tensors here are tiny: one thread avoids the synchronisation cost that dominates on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def expected_grid(name: str, n: int) -> list:
    """Stage map sizes along one side, from each family's stem / downsampling convolutions (a patch conv with
    kernel = stride on a zero-padded map is ceil(n / stride))."""
    if name.startswith('flatten_cswin'):                  # conv 7x7 stride 4 pad 2, then 3x3 stride 2 pad 1
        sizes = [conv_out(n, 7, 4, 2)]
    elif name.startswith('official_visformer'):           # stem 7x7 s2 p3, patch 4 (padded), then patch 2
        sizes = [math.ceil(conv_out(n, 7, 2, 3) / 4)]
    elif 'visformer' in name:                             # stem 7x7 s2 p3, patch 2, then patch 2
        sizes = [math.ceil(conv_out(n, 7, 2, 3) / 2)]
    else:                                                 # stride-4 stems (padded patch or 3x3 s2 p1 twice)
        sizes = [math.ceil(n / 4)]
    while len(sizes) < len(feature_reductions(name)):
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def features(name: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, features_only=True, dynamic_img_size=True, **dict(TINY[name], **kwargs))


# ----------------------------------------------------------------------------- the one call, every family
@pytest.mark.parametrize('name', list(TINY))
def test_features_only_dynamic_img_size_every_family(name):
    torch.manual_seed(0)
    model = features(name).eval()
    info = model.feature_info
    assert info.reduction() == [32 >> i for i in reversed(range(len(info.reduction())))]     # ..., 8, 16, 32
    assert info.reduction()[0] == (8 if name == 'official_visformer_tiny' else 4)
    with torch.no_grad():
        for h, w in SIZES:
            maps = model(torch.randn(2, 3, h, w))
            assert [tuple(m.shape) for m in maps] == [
                (2, c, a, b) for c, a, b in zip(info.channels(), expected_grid(name, h), expected_grid(name, w))]
            assert all(torch.isfinite(m).all() for m in maps)
        # at the built size the flag changes nothing: same weights, same maps as the fixed-size model
        fixed = timm.create_model(name, features_only=True, **TINY[name]).eval()
        fixed.load_state_dict(model.state_dict())
        x = torch.randn(1, 3, 224, 224)
        for a, b in zip(model(x), fixed(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('name', ['official_visformer_tiny', 'swin_visformer_tiny_v2'])
def test_visformer_at_another_size_equals_a_model_built_there(name):
    """A 224 model run at 448 with dynamic_img_size == a model built for 448 holding the same weights and
    position embeddings resampled here (bicubic, align_corners=False, no antialiasing). At 448 the built model
    has global attention over 28x28 (v1) or 14 / 7 windows shifted in every other block (v2), the official
    detection backbone's layout, which the dynamic model must reproduce."""
    torch.manual_seed(0)
    dyn = timm.create_model(name, dynamic_img_size=True, **TINY[name]).eval()
    big = timm.create_model(name, img_size=448, **TINY[name]).eval()
    sd = dyn.state_dict()
    for k, v in sd.items():
        if k.startswith('pos_embed'):
            sd[k] = F.interpolate(v, size=big.state_dict()[k].shape[-2:], mode='bicubic', align_corners=False)
    missing, unexpected = big.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith('attn_mask') for k in missing)
    if name == 'swin_visformer_tiny_v2':
        assert [b.shift for s in big.stages[-2:] for b in s.blocks] == [0, 7, 0, 3]
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), big(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- smp
@pytest.mark.parametrize('name', FOUR_STAGE)
def test_smp_upernet_and_fpn_every_family(name):
    torch.manual_seed(0)
    net = smp.UPerNet(f'tu-{name}', encoder_weights=None, dynamic_img_size=True, classes=5, decoder_channels=32,
                      **TINY[name])
    x = torch.randn(2, 3, 96, 160)            # smp asks for multiples of 32; the windows (7) do not divide
    out = net(x)
    assert out.shape == (2, 5, 96, 160)
    F.cross_entropy(out, torch.randint(0, 5, (2, 96, 160))).backward()
    encoder = net.encoder.model
    assert [n for n, p in encoder.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()] == []
    fpn = smp.FPN(f'tu-{name}', encoder_weights=None, dynamic_img_size=True, classes=5,
                  decoder_pyramid_channels=32, decoder_segmentation_channels=32, **TINY[name]).eval()
    with torch.no_grad():
        assert fpn(x[:1]).shape == (1, 5, 96, 160)


def test_smp_refuses_visformer_v1_for_its_strides():
    """Visformer v1 (like timm's visformer_tiny) has maps at strides 8/16/32 only; smp's timm encoder needs
    4..32 (or 2..32) and says so. Use it through torchvision's FPN (below) instead."""
    with pytest.raises(ValueError, match='downsampling pattern'):
        smp.UPerNet('tu-official_visformer_tiny', encoder_weights=None, dynamic_img_size=True,
                    **TINY['official_visformer_tiny'])


# ----------------------------------------------------------------------------- torchvision detection
def detector(name: str, cls=FasterRCNN, body=None, **kwargs):
    backbone = FeaturePyramidBackbone(body if body is not None else features(name), out_channels=16)
    levels = len(backbone.featmap_names) + 1                                 # + the max-pool level
    anchors = AnchorGenerator(tuple((s,) for s in (16, 32, 64, 128, 256)[:levels]), ((0.5, 1.0, 2.0),) * levels)
    extra = dict(mask_roi_pool=MultiScaleRoIAlign(backbone.featmap_names, 14, 2)) if cls is MaskRCNN else {}
    return cls(backbone, num_classes=3, min_size=96, max_size=160, rpn_anchor_generator=anchors,
               box_roi_pool=MultiScaleRoIAlign(backbone.featmap_names, 7, 2), representation_size=32,
               rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100,
               rpn_post_nms_top_n_test=30, box_batch_size_per_image=32, box_detections_per_img=20,
               box_score_thresh=0., **extra, **kwargs)


def scenes(generator: torch.Generator, sizes, masks: bool = False):
    """Images of the given sizes with two boxes each (filled squares of another brightness), and targets."""
    images, targets = [], []
    for h, w in sizes:
        img = torch.rand(3, h, w, generator=generator) * 0.2
        boxes, labels, mask = [], [], []
        for j in range(2):
            s = int(torch.randint(20, 40, (), generator=generator))
            y, x = int(torch.randint(0, h - s, (), generator=generator)), int(torch.randint(0, w - s, (), generator=generator))
            img[:, y:y + s, x:x + s] = 0.6 + 0.3 * j
            m = torch.zeros(h, w, dtype=torch.uint8)
            m[y:y + s, x:x + s] = 1
            boxes.append([x, y, x + s, y + s]), labels.append(j + 1), mask.append(m)
        t = dict(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor(labels))
        if masks:
            t['masks'] = torch.stack(mask)
        images.append(img), targets.append(t)
    return images, targets


def check_detections(outputs, sizes, masks: bool = False):
    assert len(outputs) == len(sizes)
    for out, (h, w) in zip(outputs, sizes):
        boxes = out['boxes']
        assert boxes.shape[1] == 4 and len(out['scores']) == len(out['labels']) == len(boxes) > 0
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        if masks:
            assert out['masks'].shape == (len(boxes), 1, h, w)


@pytest.mark.parametrize('name', list(TINY))
def test_faster_rcnn_train_step_and_eval_every_family(name):
    torch.manual_seed(0)
    model = detector(name)
    sizes = [(120, 170), (150, 110)]
    images, targets = scenes(torch.Generator().manual_seed(1), sizes)
    model.train()
    losses = model(images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    body = model.backbone.body
    assert all(p.grad is not None for p in body.parameters())
    model.eval()
    with torch.no_grad():
        check_detections(model(images), sizes)


@pytest.mark.parametrize('name', ['flatten_pvt_v2_b0', 'official_visformer_tiny'])   # 4 maps; 3 maps
def test_retinanet_over_p3_to_p7_train_step_and_eval(name):
    """RetinaNet's layout: the FPN over our maps plus torchvision's P6/P7 block (computed from the FPN's last
    level), one anchor size per level; train step reaches the backbone, eval returns boxes inside the images."""
    torch.manual_seed(0)
    backbone = FeaturePyramidBackbone(features(name), out_channels=16, extra_blocks=LastLevelP6P7(16, 16))
    assert backbone.featmap_names[-1] == str(len(backbone.body.feature_info.channels()) - 1)
    levels = len(backbone.featmap_names) + 2                                    # + p6, p7
    anchors = AnchorGenerator(tuple((s,) for s in (16, 32, 64, 128, 256, 512)[:levels]),
                              ((0.5, 1.0, 2.0),) * levels)
    model = RetinaNet(backbone, num_classes=3, min_size=96, max_size=160, anchor_generator=anchors,
                      score_thresh=0., detections_per_img=20, topk_candidates=50)
    sizes = [(120, 170), (150, 110)]
    images, targets = scenes(torch.Generator().manual_seed(1), sizes)
    with torch.no_grad():
        assert len(backbone(torch.zeros(1, 3, 96, 128))) == levels              # what the head is given
    model.train()
    losses = model(images, targets)
    assert set(losses) == {'classification', 'bbox_regression'}
    total = sum(losses.values())
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert all(p.grad is not None for p in backbone.body.parameters())
    model.eval()
    with torch.no_grad():
        check_detections(model(images), sizes)


def classification_checkpoint(tmp_path, name: str, img_size: int, **kwargs) -> str:
    """A checkpoint as this codebase's trainer writes it (model, optimizer, epoch, config text) of a 10-class
    classifier built at ``img_size``."""
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=img_size, num_classes=10, **dict(TINY[name], **kwargs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    F.cross_entropy(model(torch.randn(2, 3, img_size, img_size)), torch.tensor([1, 2])).backward()
    optimizer.step()
    path = str(tmp_path / f'{name}_{img_size}.pth')
    save_checkpoint({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 0,
                     'config': f'MODEL:\n  TYPE: {name}\n'}, path)
    return path


def test_mask_rcnn_from_a_checkpoint_train_and_eval_at_two_sizes(tmp_path):
    ckpt = classification_checkpoint(tmp_path, 'flatten_swin_t', 64)
    body = timm.create_model('flatten_swin_t', features_only=True, dynamic_img_size=True, pretrained=True,
                             pretrained_cfg_overlay=dict(file=ckpt), **TINY['flatten_swin_t'])
    model = detector('flatten_swin_t', MaskRCNN, body=body)
    generator = torch.Generator().manual_seed(2)
    for min_size, max_size in ((64, 100), (128, 200)):     # backbone inputs 64x96 and 128x192 after resizing
        model.transform.min_size, model.transform.max_size = (min_size,), max_size
        sizes = [(100, 150), (90, 130)]
        images, targets = scenes(generator, sizes, masks=True)
        model.train()
        losses = model(images, targets)
        assert 'loss_mask' in losses and all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()
        assert body.model.patch_embed.proj.weight.grad is not None
        model.eval()
        with torch.no_grad():
            check_detections(model(images), sizes, masks=True)


# ----------------------------------------------------------------------------- classification weights
def bicubic_tokens(t: torch.Tensor, size: int) -> torch.Tensor:
    """(1, n*n, C) square-grid tokens -> (1, size*size, C), written here with F.interpolate."""
    n = math.isqrt(t.shape[1])
    grid = t.reshape(1, n, n, -1).permute(0, 3, 1, 2).double()
    return F.interpolate(grid, size=(size, size), mode='bicubic', align_corners=False).permute(0, 2, 3, 1).reshape(
        1, size * size, -1)


def bicubic_maps(t: torch.Tensor, size) -> torch.Tensor:
    """(N, C, h, w) or (C, h, w) -> same at ``size`` (bicubic, align_corners=False, float64)."""
    x = t.double() if t.dim() == 4 else t.double().unsqueeze(0)
    y = F.interpolate(x, size=tuple(size), mode='bicubic', align_corners=False)
    return y if t.dim() == 4 else y.squeeze(0)


# name -> (classification img_size, dense img_size, resampled key -> reference function)
RESAMPLED = {
    'flatten_swin_t': (64, 96, {'layers.0.blocks.0.attn.positional_encoding': lambda v, w: bicubic_tokens(v, 24),
                                'layers.1.blocks.1.attn.positional_encoding': lambda v, w: bicubic_tokens(v, 12)}),
    'flatten_pvt_t': (64, 96, {'pos_embed1': lambda v, w: bicubic_tokens(v, 24),
                               'pos_embed4': lambda v, w: bicubic_tokens(v, 3),
                               'block2.0.attn.positional_encoding': lambda v, w: bicubic_tokens(v, 12)}),
    'dat_tiny': (64, 96, {'stages.0.attns.1.rpe_table': lambda v, w: bicubic_maps(v, w.shape[-2:]),
                          'stages.2.attns.1.rpe_table': lambda v, w: bicubic_maps(v, w.shape[-2:])}),
    'official_visformer_tiny': (64, 96, {'pos_embed1': lambda v, w: bicubic_maps(v, (12, 12)),
                                         'pos_embed3': lambda v, w: bicubic_maps(v, (3, 3))}),
    'swin_visformer_tiny_v2': (64, 96, {'pos_embed0': lambda v, w: bicubic_maps(v, (24, 24)),
                                        'pos_embed2': lambda v, w: bicubic_maps(v, (6, 6))}),
}


@pytest.mark.parametrize('name', list(RESAMPLED))
def test_classification_checkpoint_to_feature_backbone_at_another_size(tmp_path, caplog, name):
    small, big, refs = RESAMPLED[name]
    ckpt = classification_checkpoint(tmp_path, name, small)
    source = torch.load(ckpt, weights_only=True)['model']
    with caplog.at_level(logging.INFO, logger='models'):
        model = timm.create_model(name, features_only=True, pretrained=True, img_size=big, dynamic_img_size=True,
                                  pretrained_cfg_overlay=dict(file=ckpt), **TINY[name])
    loaded = model.model.state_dict()
    for key, ref in refs.items():
        assert loaded[key].shape != source[key].shape
        torch.testing.assert_close(loaded[key].double(), ref(source[key], loaded[key]), rtol=1e-5, atol=1e-6)
    same = [k for k in loaded if k in source and loaded[k].shape == source[k].shape]
    assert len(same) > 0.8 * len(loaded)
    for k in same:
        if not k.endswith(('relative_position_index', 'attn_mask')):
            assert torch.equal(loaded[k], source[k]), k
    head = 'cls_head' if name.startswith('dat') else 'head'
    assert not any(k.startswith(head + '.') for k in loaded)
    lines = [r.getMessage() for r in caplog.records if r.name == 'models.builder']
    assert len(lines) == 1 and f'{head}.weight (feature backbone)' in lines[0]
    assert all(k in lines[0] for k in list(refs)[:1])
    assert 'not in the file' not in lines[0]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 97, 131))
    assert all(torch.isfinite(m).all() for m in maps)


# ----------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize('name', pyramid_reps())
def test_grad_checkpointing_in_feature_mode(name):
    """``set_grad_checkpointing`` on the feature wrapper: same maps and gradients, and layers really run
    again during backward (counted with forward hooks on every Linear / Conv2d)."""
    torch.manual_seed(0)
    model = features(name, drop_path_rate=0.)
    x = torch.randn(2, 3, 99, 70)
    calls = {'n': 0}
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_hook(lambda *a: calls.__setitem__('n', calls['n'] + 1))
    results = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        calls['n'] = 0
        maps = model(x)
        forward_calls = calls['n']
        sum((m * torch.linspace(-1, 1, m.shape[1]).view(1, -1, 1, 1)).square().mean() for m in maps).backward()
        results.append(([m.detach() for m in maps], [p.grad.clone() for p in model.parameters()],
                        calls['n'] - forward_calls))
    (maps0, grads0, again0), (maps1, grads1, again1) = results
    assert again0 == 0 and again1 > 0
    for a, b in zip(maps0 + grads0, maps1 + grads1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- a short fine-tune, measured
def digit_scenes(images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator, size: int = 64):
    """Scenes of ``size`` px holding two scikit-learn digits (real 8x8 scans, upscaled 3x) in two of the four
    quadrants; per-pixel label = digit + 1 on the digit's strokes (scan value > 4 of 16), 0 elsewhere."""
    x = np.zeros((n, 3, size, size), np.float32)
    y = np.zeros((n, size, size), np.int64)
    cell = size // 2
    for i in range(n):
        for q in rng.choice(4, size=2, replace=False):
            j = rng.integers(len(images))
            digit = np.kron(images[j], np.ones((3, 3))) / 16.0                 # 24 x 24
            oy, ox = (q // 2) * cell + rng.integers(0, cell - 24 + 1), (q % 2) * cell + rng.integers(0, cell - 24 + 1)
            x[i, :, oy:oy + 24, ox:ox + 24] = digit
            y[i, oy:oy + 24, ox:ox + 24][digit > 4 / 16] = labels[j] + 1
    return torch.from_numpy((x - 0.2) / 0.3), torch.from_numpy(y)


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean over the classes present in the target or the prediction of |pred ∩ target| / |pred ∪ target|."""
    ious = []
    for c in range(num_classes):
        p, t = pred == c, target == c
        union = (p | t).sum().item()
        if union:
            ious.append((p & t).sum().item() / union)
    return float(np.mean(ious))


def test_upernet_fine_tune_on_digit_scenes_beats_the_constant_baseline(tmp_path):
    """smp UPerNet over FLatten-Swin (initialised from a classification checkpoint written here) trained for 30
    steps on scenes of the scanned digits 0 and 1 (3 classes with the background; a tiny model separates these
    two shapes within the budget, ten digits need far longer): the loss falls and the held-out mIoU beats the
    best constant prediction (background everywhere) by a wide margin."""
    digits = load_digits()
    keep = np.random.default_rng(0).permutation(np.flatnonzero(digits.target < 2))
    train_idx, val_idx = keep[:270], keep[270:]
    rng = np.random.default_rng(0)
    val_x, val_y = digit_scenes(digits.images[val_idx], digits.target[val_idx], 32, rng)
    ckpt = classification_checkpoint(tmp_path, 'flatten_swin_t', 64)
    torch.manual_seed(0)
    net = smp.UPerNet('tu-flatten_swin_t', encoder_weights=True, pretrained_cfg_overlay=dict(file=ckpt),
                      dynamic_img_size=True, classes=3, decoder_channels=32, **TINY['flatten_swin_t'])
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    net.train()
    for step in range(30):
        x, y = digit_scenes(digits.images[train_idx], digits.target[train_idx], 8, rng)
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        pred = net(val_x).argmax(1)
    miou = mean_iou(pred, val_y, 3)
    baseline = mean_iou(torch.zeros_like(val_y), val_y, 3)       # the best constant: background everywhere
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    assert miou > baseline + 0.2, (miou, baseline)
