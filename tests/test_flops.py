"""FLOPs as any counter sees them: plain fvcore on a normally built model gives the official counts, the
fast paths hide no matmul from fvcore or torch's FlopCounterMode, and the two counters agree.

The pinned numbers are the official GFLOPs of the README "Models" table (fvcore on the official model
code, one multiply-add = one flop). Cost on 2 idle cores: a 224 model takes seconds to trace. The normal
suite counts the smallest config; ``slow`` (run in CI) one small config per family and DAT++'s 384 px
config; the other 21 shipped configs are opt-in (``pytest -m flops_full tests/test_flops.py``, about a minute
on 2 idle cores).
"""
import os
import warnings

import pytest
import torch
import torch.nn as nn
import timm

from config import load_config
from models import build_model
from models.dat import NeighborhoodAttention
from models.flatten_swin import FocusedLinearWindowAttention
from models.flops import FVCORE_HANDLES
from models.focused_attention import get_attention_impl
from models.layers import WindowAttention
from models.neighborhood_attention import natten_flops
from our_registry import family_reps, tiny_input_size, tiny_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# official GFLOPs (README "Models" table, column "official params / GFLOPs")
OFFICIAL_GFLOPS = {
    'flatten_pvt_t': 2.048, 'flatten_pvt_s': 4.047, 'flatten_pvt_m': 7.061, 'flatten_pvt_b': 10.414,
    'flatten_pvt_v2_b0': 0.586, 'flatten_pvt_v2_b1': 2.231, 'flatten_pvt_v2_b2': 4.269,
    'flatten_pvt_v2_b3': 7.310, 'flatten_pvt_v2_b4': 10.713,
    'flatten_swin_t': 4.502, 'flatten_swin_s': 8.761, 'flatten_swin_b': 15.458, 'flatten_swin_b_384': 46.491,
    'flatten_cswin_t': 4.344, 'flatten_cswin_s': 6.810, 'flatten_cswin_b': 14.957, 'flatten_cswin_b_384': 46.433,
    'dat_tiny': 4.289, 'dat_small': 9.428, 'dat_base': 16.562, 'dat_base_384': 49.742,
    'l2vit_tiny': 4.714, 'l2vit_small': 9.018, 'l2vit_base': 15.858, 'l2vit_base_384': 47.469,
    'visformer_tiny': 1.271, 'visformer_small': 4.885, 'visformer_tiny_v2': 1.287,
    'visformer_small_v2': 4.274, 'visformer_medium_v2': 8.462,
}
NORMAL = ('flatten_pvt_v2_b0',)
SLOW = ('flatten_pvt_t', 'flatten_swin_t', 'flatten_cswin_t', 'dat_tiny', 'dat_base_384',
        'l2vit_tiny', 'visformer_tiny', 'visformer_tiny_v2')


def _marked(name: str):
    if name in NORMAL:
        return name
    return pytest.param(name, marks=pytest.mark.slow if name in SLOW else pytest.mark.flops_full)


def fvcore_analysis(model: nn.Module, *inputs: torch.Tensor, handles: bool = True):
    """What a user writes: FlopCountAnalysis(model, x) (+ the one SDPA handle), warnings silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore')
        from fvcore.nn import FlopCountAnalysis
        analysis = FlopCountAnalysis(model.eval(), inputs)
        if handles:
            analysis.set_op_handle(**FVCORE_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
        analysis.total()
    return analysis


def flop_counter(model: nn.Module, *inputs: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(*inputs)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- every shipped config
@pytest.mark.parametrize('name', [_marked(n) for n in OFFICIAL_GFLOPS])
def test_plain_fvcore_gives_official_count(name, request):
    if name not in NORMAL + SLOW and 'flops_full' not in (request.config.option.markexpr or ''):
        pytest.skip('opt-in (about a minute on 2 cores): pytest -m flops_full tests/test_flops.py')
    config = load_config(os.path.join(ROOT, 'cfgs', f'{name}.yaml'))
    assert get_attention_impl() == 'fast'                   # the default build, fast paths on
    size = config.DATA.IMG_SIZE
    gflops = fvcore_analysis(build_model(config), torch.zeros(1, 3, size, size)).total() / 1e9
    assert abs(gflops / OFFICIAL_GFLOPS[name] - 1) < 1e-3, (name, gflops)


# ----------------------------------------------------------------------------- fast paths hide nothing
def autograd_names(out: torch.Tensor) -> set:
    """Class names of every node of out's autograd graph."""
    names, stack, seen = set(), [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_focused_linear_attention_counted_from_its_definition():
    """One FLatten window attention (fast path by default): fvcore and FlopCounterMode see every product.
    Definition, per window and head (N tokens, d = C / heads): Q mean(K)^T (N d), K^T V (N d^2), Q (K^T V)
    (N d^2); the dwc branch N d k^2; qkv and proj N C (3C + C)."""
    B, window, heads, C, ks = 2, 4, 2, 16, 3
    module = FocusedLinearWindowAttention(C, window, heads, kernel_size=ks).eval()
    N, d = window * window, C // heads
    x = torch.randn(B, N, C)
    expected = B * (heads * (N * d + 2 * N * d * d + N * d * ks * ks) + N * C * 4 * C)
    assert get_attention_impl() == 'fast'
    assert fvcore_analysis(module, x).total() == expected
    assert flop_counter(module, x) == 2 * expected


def test_fast_focused_path_stays_the_eager_default():
    """Eager calls still run the fused autograd Functions (only tracers and counters get the plain form)."""
    module = FocusedLinearWindowAttention(16, 4, 2, kernel_size=3)
    out = module.attend(*(torch.randn(2, 16, 16, requires_grad=True) for _ in range(3)), hw=(4, 4))
    names = autograd_names(out)
    assert any('LinearCoreFn' in n for n in names), names
    assert any('FocusedKernelFn' in n for n in names), names


def test_neighbourhood_attention_counted_by_natten_rule():
    """DAT++'s 'N' block (fused op by default): both counters see natten's count QK + RPB = k^2 (d + 1),
    AV = k^2 d per query and head, plus qkv and proj."""
    B, h, H, W, d, k = 2, 3, 9, 8, 4, 5
    module = NeighborhoodAttention(h * d, k, h).eval()
    x = torch.randn(B, h * d, H, W)
    assert natten_flops(B, h, H, W, d, k) == B * h * H * W * k * k * (2 * d + 1)
    expected = natten_flops(B, h, H, W, d, k) + B * H * W * (h * d) * 4 * (h * d)
    assert fvcore_analysis(module, x).total() == expected
    assert flop_counter(module, x) == 2 * expected
    assert any('NeighborhoodAttention2D' in n for n in autograd_names(module(x.requires_grad_())))   # eager: fused


def test_softmax_attention_counted_without_handles():
    """Window softmax attention (fused SDPA in eager): tracers get the explicit formulas, so plain fvcore
    counts QK^T and AV (N^2 d each per window and head) with no handle."""
    B, window, heads, C = 3, 4, 2, 16
    module = WindowAttention(C, window, heads).eval()
    N, d = window * window, C // heads
    x = torch.randn(B, N, C)
    expected = B * N * C * 4 * C + B * heads * 2 * N * N * d
    assert fvcore_analysis(module, x, handles=False).total() == expected
    assert flop_counter(module, x) == 2 * expected


class _FusedAttention(nn.Module):
    """What other models (timm's own) do: F.scaled_dot_product_attention on (B, heads, N, d)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_sdpa_handle_counts_the_two_matmuls():
    """fvcore skips the fused op (no handle in fvcore 0.1.5); FVCORE_HANDLES prices it as L S (E + Ev)."""
    B, h, L, S, E, Ev = 2, 3, 5, 7, 4, 6
    q, k, v = torch.randn(B, h, L, E), torch.randn(B, h, S, E), torch.randn(B, h, S, Ev)
    assert fvcore_analysis(_FusedAttention(), q, k, v, handles=False).total() == 0
    assert fvcore_analysis(_FusedAttention(), q, k, v).total() == B * h * (L * S * E + L * S * Ev)


# ----------------------------------------------------------------------------- the two counters agree
# fvcore prices these ops by their multiply-adds; FlopCounterMode counts the same products at 2 flops each.
PRODUCTS = {'linear', 'matmul', 'bmm', 'einsum', 'conv', 'addmm', 'mm', 'scaled_dot_product_attention'}
# fvcore also prices these element-wise (norms 2-5 / element, pooling, interpolation); FlopCounterMode does not.
ELEMENTWISE = {'layer_norm', 'batch_norm', 'group_norm', 'instance_norm', 'adaptive_avg_pool2d',
               'upsample_bilinear2d', 'upsample_nearest2d', 'grid_sampler'}


@pytest.mark.parametrize('name', family_reps())
def test_flop_counter_mode_is_twice_fvcore_products(name):
    """Every family (its tiny variant off the registry, fast paths on): FlopCounterMode counts each product
    fvcore prices, at 2 flops a multiply-add, and fvcore prices nothing else but the element-wise ops."""
    model = timm.create_model(name, **tiny_kwargs(name))
    size = tiny_input_size(name)
    x = torch.randn(1, 3, size, size)
    by_op = fvcore_analysis(model, x).by_operator()
    assert set(by_op) <= PRODUCTS | ELEMENTWISE, set(by_op) - PRODUCTS - ELEMENTWISE
    products = sum(v for op, v in by_op.items() if op in PRODUCTS)
    assert flop_counter(model, x) == 2 * products
