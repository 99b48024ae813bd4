"""Independent references for DAT++ (tests/test_dat.py), written from the definitions, not from models/.

  * :func:`neighborhood_reference`: natten 0.14.6 neighbourhood attention as an explicit double loop over
    clamped windows, bias read from the table at the true offset.
  * :func:`deformable_reference`: the deformable attention of one module as explicit per-query, per-key
    loops, with a hand-written bilinear interpolation (align-corners, zero outside the map).
  * :func:`bicubic_resize`: separable bicubic resampling (Keys kernel a = -0.75, half-pixel centres, edge
    clamping), the rule of ``F.interpolate(mode='bicubic', align_corners=False)``, written out.
  * :func:`official_keys`: the (key, shape) list of the official DAT model for a MODEL.DAT config, derived
    from the official module structure (LeapLabTHU/DAT models/dat.py, dat_blocks.py, nat.py): modules in
    registration order, a module's own parameters before its children's.
All loops run in float64.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- neighbourhood attention
def neighborhood_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor,
                           kernel: int) -> torch.Tensor:
    """q (pre-scaled), k, v: (B, heads, H, W, d); rpb (heads, 2k-1, 2k-1). Requires H, W >= kernel."""
    q, k, v, rpb = (t.double() for t in (q, k, v, rpb))
    B, h, H, W, d = q.shape
    r = kernel // 2
    out = torch.zeros(B, h, H, W, d, dtype=torch.float64)
    for i in range(H):
        top = min(max(i - r, 0), H - kernel)
        for j in range(W):
            left = min(max(j - r, 0), W - kernel)
            logits, values = [], []
            for y in range(top, top + kernel):
                for x in range(left, left + kernel):
                    bias = rpb[:, y - i + kernel - 1, x - j + kernel - 1]                 # (h,)
                    logits.append((q[:, :, i, j] * k[:, :, y, x]).sum(-1) + bias)      # (B, h)
                    values.append(v[:, :, y, x])
            weights = torch.stack(logits, -1).softmax(-1)                              # (B, h, k*k)
            out[:, :, i, j] = (weights.unsqueeze(-1) * torch.stack(values, 2)).sum(2)
    return out


@torch.no_grad()
def neighborhood_module_reference(module, x: torch.Tensor) -> torch.Tensor:
    """The 'N' block on an NCHW map: zero-pad bottom/right to the kernel, qkv (Linear), heads of head_dim
    contiguous channels in [q | k | v], q scaled, attention, crop, proj."""
    k_size = module.kernel_size
    heads = module.num_heads
    x = x.double().permute(0, 2, 3, 1)
    B, H0, W0, C = x.shape
    x = F.pad(x, (0, 0, 0, max(0, k_size - W0), 0, max(0, k_size - H0)))
    H, W = x.shape[1:3]
    qkv = x @ module.qkv.weight.double().T + module.qkv.bias.double()
    d = C // heads
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, H, W, heads, d).permute(0, 3, 1, 2, 4) for i in range(3))
    out = neighborhood_reference(q * d ** -0.5, k, v, module.rpb, k_size)
    out = out.permute(0, 2, 3, 1, 4).reshape(B, H, W, C)[:, :H0, :W0]
    out = out @ module.proj.weight.double().T + module.proj.bias.double()
    return out.permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- deformable attention
def bilinear(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """img (C, H, W) at normalised (y, x) in align-corners convention (-1 -> first pixel centre, +1 -> last);
    points outside contribute zero (zero padding)."""
    C, H, W = img.shape
    py, px = (y + 1) / 2 * (H - 1), (x + 1) / 2 * (W - 1)
    y0, x0 = math.floor(py), math.floor(px)
    out = torch.zeros(C, dtype=img.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < H and 0 <= xx < W:
                out = out + wy * wx * img[:, yy, xx]
    return out


def _conv1x1(conv, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum('oc,bchw->bohw', conv.weight.double()[:, :, 0, 0], x) + conv.bias.double().view(1, -1, 1, 1)


@torch.no_grad()
def deformable_reference(module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The 'D' block on an NCHW map, float64. Returns (output (B, C, H, W), positions (B, g, Hk, Wk, 2)).

    Offsets: the offset network is conv -> LayerNorm over channels -> GELU -> 1x1 conv (no bias) on each
    group's slice of q, shared by groups; channel 0 = y, 1 = x. Reference point of key (a, b) on an
    Hk x Wk grid: y = (2a + 1) / (Hk - 1) - 1, x = (2b + 1) / (Wk - 1) - 1. Position = clamp(ref + offset,
    -1, 1). Keys/values: 1x1 projections of the block input sampled there (per group channels). Bias of
    (query (i, j), key at p): the table (2qh-1, 2qw-1) sampled at ((i/(H-1)*2-1 - p_y)/2,
    (j/(W-1)*2-1 - p_x)/2). Scale head_dim^-0.5 on the logits."""
    x = x.double()
    B, C, H, W = x.shape
    g, heads = module.groups, module.num_heads
    gc, hg, d = C // g, heads // g, C // heads
    q = _conv1x1(module.proj_q, x)
    conv, ln, _, out_conv = module.conv_offset
    qg = q.reshape(B * g, gc, H, W)
    off = F.conv2d(qg, conv.weight.double(), conv.bias.double(), conv.stride, conv.padding, groups=gc)
    off = F.layer_norm(off.permute(0, 2, 3, 1), (gc,), ln.norm.weight.double(), ln.norm.bias.double(), 1e-5)
    off = F.gelu(off.permute(0, 3, 1, 2))
    off = torch.einsum('oc,bchw->bohw', out_conv.weight.double()[:, :, 0, 0], off)        # (Bg, 2, Hk, Wk)
    Hk, Wk = off.shape[-2:]
    pos = torch.zeros(B * g, Hk, Wk, 2, dtype=torch.float64)
    for a in range(Hk):
        for b in range(Wk):
            ref_y, ref_x = (2 * a + 1) / (Hk - 1) - 1, (2 * b + 1) / (Wk - 1) - 1
            pos[:, a, b, 0] = (off[:, 0, a, b] + ref_y).clamp(-1, 1)
            pos[:, a, b, 1] = (off[:, 1, a, b] + ref_x).clamp(-1, 1)
    n = Hk * Wk
    xg = x.reshape(B * g, gc, H, W)
    sampled = torch.zeros(B * g, gc, n, dtype=torch.float64)
    for bg in range(B * g):
        for a in range(Hk):
            for b in range(Wk):
                sampled[bg, :, a * Wk + b] = bilinear(xg[bg], float(pos[bg, a, b, 0]), float(pos[bg, a, b, 1]))
    sampled = sampled.reshape(B, C, 1, n)
    keys = _conv1x1(module.proj_k, sampled).reshape(B, heads, d, n)
    values = _conv1x1(module.proj_v, sampled).reshape(B, heads, d, n)
    queries = q.reshape(B, heads, d, H * W)
    table = module.rpe_table.double()
    out = torch.zeros(B, heads, d, H * W, dtype=torch.float64)
    for bi in range(B):
        for head in range(heads):
            grp = head // hg
            pg = pos[bi * g + grp].reshape(n, 2)
            for i in range(H):
                for j in range(W):
                    m = i * W + j
                    qy, qx = i / (H - 1) * 2 - 1, j / (W - 1) * 2 - 1
                    logits = torch.zeros(n, dtype=torch.float64)
                    for t in range(n):
                        bias = bilinear(table[head:head + 1], (qy - float(pg[t, 0])) / 2, (qx - float(pg[t, 1])) / 2)
                        logits[t] = (queries[bi, head, :, m] * keys[bi, head, :, t]).sum() * d ** -0.5 + bias[0]
                    out[bi, head, :, m] = values[bi, head] @ logits.softmax(0)
    y = _conv1x1(module.proj_out, out.reshape(B, C, H, W))
    return y, pos.reshape(B, g, Hk, Wk, 2)


# ----------------------------------------------------------------------------- bicubic
def _cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def _resize_matrix(src: int, dst: int) -> torch.Tensor:
    """(dst, src) weights: output i samples the input at (i + 0.5) * src / dst - 0.5 with 4 cubic taps,
    indices clamped to the border."""
    m = torch.zeros(dst, src, dtype=torch.float64)
    for i in range(dst):
        pos = (i + 0.5) * src / dst - 0.5
        base = math.floor(pos)
        for tap in range(base - 1, base + 3):
            m[i, min(max(tap, 0), src - 1)] += _cubic(pos - tap)
    return m


def bicubic_resize(table: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(C, h, w) -> (C, *size), separable bicubic."""
    rows, cols = _resize_matrix(table.shape[1], size[0]), _resize_matrix(table.shape[2], size[1])
    return torch.einsum('ih,chw,jw->cij', rows, table.double(), cols)


# ----------------------------------------------------------------------------- official state-dict layout
def official_keys(cfg: Dict) -> List[Tuple[str, Tuple[int, ...]]]:
    """(key, shape) of the official DAT(**cfg) for the released options (conv patches, LPUs, conv MLPs,
    'N'/'D' blocks with use_pe, no layer scale), in state_dict order."""
    out: List[Tuple[str, Tuple[int, ...]]] = []

    def add(name: str, *shape: int) -> None:
        out.append((name, tuple(shape)))

    def layer_norm(prefix: str, c: int) -> None:
        add(f'{prefix}.norm.weight', c)
        add(f'{prefix}.norm.bias', c)

    stem, dims, depths, heads = cfg['dim_stem'], cfg['dims'], cfg['depths'], cfg['heads']
    p = cfg['patch_size']
    # patch_proj: conv(3, stem/2, 3, stride p/2), LN, GELU, conv(stem/2, stem, 3, stride p/2), LN
    add('patch_proj.0.weight', stem // 2, 3, 3, 3)
    add('patch_proj.0.bias', stem // 2)
    layer_norm('patch_proj.1', stem // 2)
    add('patch_proj.3.weight', stem, stem // 2, 3, 3)
    add('patch_proj.3.bias', stem)
    layer_norm('patch_proj.4', stem)
    fmap = cfg['img_size'] // p
    for i in range(4):
        c, s = dims[i], f'stages.{i}'
        dim_in = stem if i == 0 else dims[i - 1] * 2
        if dim_in != c:
            add(f'{s}.proj.weight', c, dim_in, 1, 1)
            add(f'{s}.proj.bias', c)
        for j in range(2 * depths[i]):
            layer_norm(f'{s}.layer_norms.{j}', c)
        hidden = c * cfg['expansion']
        for j in range(depths[i]):            # TransformerMLPWithConv: linear1.0, linear2.0, then dwc
            add(f'{s}.mlps.{j}.linear1.0.weight', hidden, c, 1, 1)
            add(f'{s}.mlps.{j}.linear1.0.bias', hidden)
            add(f'{s}.mlps.{j}.linear2.0.weight', c, hidden, 1, 1)
            add(f'{s}.mlps.{j}.linear2.0.bias', c)
            add(f'{s}.mlps.{j}.dwc.weight', hidden, 1, 3, 3)
            add(f'{s}.mlps.{j}.dwc.bias', hidden)
        for j, letter in enumerate(cfg['stage_spec'][i]):
            a = f'{s}.attns.{j}'
            if letter == 'N':                 # rpb, qkv, (attn_drop), proj
                kk = cfg['nat_ksizes'][i]
                add(f'{a}.rpb', heads[i], 2 * kk - 1, 2 * kk - 1)
                add(f'{a}.qkv.weight', 3 * c, c)
                add(f'{a}.qkv.bias', 3 * c)
                add(f'{a}.proj.weight', c, c)
                add(f'{a}.proj.bias', c)
            elif letter == 'D':               # rpe_table, conv_offset, proj_q/k/v/out
                gc = c // cfg['groups'][i]
                ks = cfg['ksizes'][i]
                add(f'{a}.rpe_table', heads[i], 2 * fmap - 1, 2 * fmap - 1)
                add(f'{a}.conv_offset.0.weight', gc, 1, ks, ks)
                add(f'{a}.conv_offset.0.bias', gc)
                layer_norm(f'{a}.conv_offset.1', gc)
                add(f'{a}.conv_offset.3.weight', 2, gc, 1, 1)
                for proj in ('proj_q', 'proj_k', 'proj_v', 'proj_out'):
                    add(f'{a}.{proj}.weight', c, c, 1, 1)
                    add(f'{a}.{proj}.bias', c)
            else:
                raise ValueError(f'letter {letter} is not part of the released layouts')
        for j in range(depths[i]):
            add(f'{s}.local_perception_units.{j}.weight', c, 1, 3, 3)
            add(f'{s}.local_perception_units.{j}.bias', c)
        fmap //= 2
    for i in range(3):
        add(f'down_projs.{i}.0.weight', dims[i + 1], dims[i], 3, 3)
        layer_norm(f'down_projs.{i}.1', dims[i + 1])
    layer_norm('cls_norm', dims[-1])
    add('cls_head.weight', cfg['num_classes'], dims[-1])
    add('cls_head.bias', cfg['num_classes'])
    return out


def read_key_fixture(path: str) -> List[Tuple[str, Tuple[int, ...]]]:
    """Lines 'key dim0,dim1,...' -> [(key, shape)]."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip() and not line.startswith('#'):
                key, shape = line.split()
                rows.append((key, tuple(int(s) for s in shape.split(','))))
    return rows


def write_key_fixture(path: str, rows: Sequence[Tuple[str, Tuple[int, ...]]], header: str) -> None:
    with open(path, 'w') as f:
        f.write(f'# {header}\n')
        for key, shape in rows:
            f.write(f"{key} {','.join(str(s) for s in shape)}\n")
