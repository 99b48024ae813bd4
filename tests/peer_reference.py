"""Float64 naive references for L2ViT and Visformer, written from the definitions with explicit loops.

Nothing here imports ``models``: every function takes plain tensors (weights as read from a module's
state_dict) and recomputes the layer the slow, obvious way:

  * L2ViT enhanced linear attention, in the "attention matrix first" form of the definition:
        out_i = temperature * sum_j (q_i . k_j) v_j / max(sum_j q_i . k_j, 100),  q, k = relu(.)
    (the model computes it key-value first; both orders are the same function);
  * the LCM (depth-wise 7x7 -> GELU -> BatchNorm -> depth-wise 7x7), CPE, LayerNorm, MLP, and whole LWA / LGA
    blocks (LWA: map zero-padded to whole windows after norm1, padded tokens attend unmasked);
  * Visformer softmax attention with the qk-scale EXPONENT (q and k each times head_dim ** exponent), global
    (v1) or in Swin windows with relative position bias, cyclic shift and the -100 region mask (v2); the
    Visformer MLP with its grouped 3x3 conv; BatchNorm in eval mode.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- elementwise / norms
def relu(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, torch.zeros_like(x))


def gelu(x: Tensor) -> Tensor:
    """Exact GELU: x * Phi(x)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Over the last dim; biased variance."""
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def batch_norm_eval(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor,
                    eps: float = 1e-5) -> Tensor:
    """x (C, H, W) with running statistics, per channel."""
    out = torch.empty_like(x)
    for c in range(x.shape[0]):
        out[c] = (x[c] - mean[c]) / math.sqrt(float(var[c]) + eps) * weight[c] + bias[c]
    return out


def bn_params(sd: Dict[str, Tensor], prefix: str):
    return (sd[prefix + 'weight'], sd[prefix + 'bias'], sd[prefix + 'running_mean'], sd[prefix + 'running_var'])


def softmax_row(logits: Tensor) -> Tensor:
    e = torch.exp(logits - logits.max())
    return e / e.sum()


# ----------------------------------------------------------------------------- convolutions
def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], padding: int, groups: int = 1) -> Tensor:
    """Stride-1 grouped convolution of x (C_in, H, W) by a sum over kernel offsets. weight (C_out, C_in/g, k, k)."""
    C_in, H, W = x.shape
    C_out, cpg, k, _ = weight.shape
    xp = torch.zeros(C_in, H + 2 * padding, W + 2 * padding, dtype=x.dtype)
    xp[:, padding:padding + H, padding:padding + W] = x
    Ho, Wo = H + 2 * padding - k + 1, W + 2 * padding - k + 1
    out = torch.zeros(C_out, Ho, Wo, dtype=x.dtype)
    opg = C_out // groups
    for o in range(C_out):
        g = o // opg
        for ci in range(cpg):
            for dy in range(k):
                for dx in range(k):
                    out[o] += weight[o, ci, dy, dx] * xp[g * cpg + ci, dy:dy + Ho, dx:dx + Wo]
        if bias is not None:
            out[o] += bias[o]
    return out


def depthwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """'Same' depth-wise convolution of x (C, H, W); weight (C, 1, k, k)."""
    C, H, W = x.shape
    k = weight.shape[-1]
    p = k // 2
    xp = torch.zeros(C, H + 2 * p, W + 2 * p, dtype=x.dtype)
    xp[:, p:p + H, p:p + W] = x
    out = torch.zeros_like(x)
    for dy in range(k):
        for dx in range(k):
            out += weight[:, 0, dy, dx].view(C, 1, 1) * xp[:, dy:dy + H, dx:dx + W]
    return out + (bias.view(C, 1, 1) if bias is not None else 0)


def pointwise(x: Tensor, weight: Tensor) -> Tensor:
    """1x1 conv without bias of x (C_in, H, W); weight (C_out, C_in, 1, 1)."""
    return torch.einsum('oi,ihw->ohw', weight[:, :, 0, 0], x)


# ----------------------------------------------------------------------------- L2ViT
def l2vit_linear_attention(x: Tensor, qkv_w: Tensor, qkv_b: Tensor, temperature: Tensor, proj_w: Tensor,
                           proj_b: Tensor, heads: int, clamp: Optional[float] = 100.0) -> Tensor:
    """x (N, C) tokens of one image -> (N, C). ``clamp=None`` gives the unclamped variant (for tests that
    check the clamp matters)."""
    N, C = x.shape
    d = C // heads
    qkv = x @ qkv_w.T + qkv_b                                    # (N, 3C) laid out as (3, heads, d)
    out = torch.zeros(N, C, dtype=x.dtype)
    for h in range(heads):
        q = relu(qkv[:, h * d:(h + 1) * d])
        k = relu(qkv[:, C + h * d:C + (h + 1) * d])
        v = qkv[:, 2 * C + h * d:2 * C + (h + 1) * d]
        for i in range(N):
            scores = torch.stack([q[i] @ k[j] for j in range(N)])   # q_i . k_j
            den = scores.sum()
            if clamp is not None:
                den = torch.clamp(den, min=clamp)
            out[i, h * d:(h + 1) * d] = temperature[h].reshape(()) * (scores @ v) / den
    return out @ proj_w.T + proj_b


def l2vit_denominators(x: Tensor, qkv_w: Tensor, qkv_b: Tensor, heads: int) -> Tensor:
    """(heads, N) unclamped q_i . sum_j k_j, to check which side of the clamp a test input falls."""
    N, C = x.shape
    d = C // heads
    qkv = x @ qkv_w.T + qkv_b
    return torch.stack([relu(qkv[:, h * d:(h + 1) * d]) @ relu(qkv[:, C + h * d:C + (h + 1) * d]).sum(0)
                        for h in range(heads)])


def window_softmax_attention(tokens: Tensor, qkv_w: Tensor, qkv_b: Optional[Tensor], proj_w: Tensor,
                             proj_b: Optional[Tensor], heads: int, q_mult: float, k_mult: float,
                             bias: Optional[Tensor] = None) -> Tensor:
    """Softmax attention among the n tokens (n, C) of one window: logits (q_i * q_mult) . (k_j * k_mult)
    (+ bias[h, i, j]). qkv_w/proj_w are (out, in) matrices."""
    n, C = tokens.shape
    d = qkv_w.shape[0] // 3 // heads
    qkv = tokens @ qkv_w.T + (qkv_b if qkv_b is not None else 0)
    out = torch.zeros(n, heads * d, dtype=tokens.dtype)
    for h in range(heads):
        q = qkv[:, h * d:(h + 1) * d] * q_mult
        k = qkv[:, heads * d + h * d:heads * d + (h + 1) * d] * k_mult
        v = qkv[:, 2 * heads * d + h * d:2 * heads * d + (h + 1) * d]
        for i in range(n):
            logits = torch.stack([q[i] @ k[j] for j in range(n)])
            if bias is not None:
                logits = logits + bias[h, i]
            out[i, h * d:(h + 1) * d] = softmax_row(logits) @ v
    return out @ proj_w.T + (proj_b if proj_b is not None else 0)


def mlp(x: Tensor, sd: Dict[str, Tensor], prefix: str) -> Tensor:
    """fc1 -> GELU -> fc2 on (N, C) tokens."""
    return gelu(x @ sd[prefix + 'fc1.weight'].T + sd[prefix + 'fc1.bias']) @ sd[prefix + 'fc2.weight'].T \
        + sd[prefix + 'fc2.bias']


def _to_map(x: Tensor, H: int, W: int) -> Tensor:
    return x.T.reshape(-1, H, W)


def _to_tokens(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).T


def cpe(x: Tensor, H: int, W: int, sd: Dict[str, Tensor], prefix: str) -> Tensor:
    return x + _to_tokens(depthwise_conv(_to_map(x, H, W), sd[prefix + 'proj.weight'], sd[prefix + 'proj.bias']))


def lcm(x: Tensor, H: int, W: int, sd: Dict[str, Tensor], prefix: str) -> Tensor:
    """(N, C) tokens -> (N, C): dwconv7 -> GELU -> BatchNorm (eval) -> dwconv7."""
    y = depthwise_conv(_to_map(x, H, W), sd[prefix + 'conv1.weight'], sd[prefix + 'conv1.bias'])
    y = batch_norm_eval(gelu(y), *bn_params(sd, prefix + 'bn.'))
    return _to_tokens(depthwise_conv(y, sd[prefix + 'conv2.weight'], sd[prefix + 'conv2.bias']))


def l2vit_lga_block(x: Tensor, H: int, W: int, sd: Dict[str, Tensor], heads: int) -> Tensor:
    """LGA block on one image's (H*W, C) tokens, weights from the block's state_dict (eval mode)."""
    ln = lambda t, name: layer_norm(t, sd[name + '.weight'], sd[name + '.bias'])  # noqa: E731
    x = cpe(x, H, W, sd, 'cpe.0.')
    x = x + l2vit_linear_attention(ln(x, 'norm1'), sd['attn.qkv.weight'], sd['attn.qkv.bias'],
                                   sd['attn.temperature'], sd['attn.proj.weight'], sd['attn.proj.bias'], heads)
    x = x + lcm(ln(x, 'norm3'), H, W, sd, 'local_mp.')
    return x + mlp(ln(x, 'norm2'), sd, 'mlp.')


def l2vit_lwa_block(x: Tensor, H: int, W: int, sd: Dict[str, Tensor], heads: int, window: int) -> Tensor:
    """LWA block on one image's (H*W, C) tokens: windows over the map zero-padded (after norm1) to whole
    windows; each window attends among all its w*w tokens, padded ones included; no bias, no shift."""
    C = x.shape[1]
    ln = lambda t, name: layer_norm(t, sd[name + '.weight'], sd[name + '.bias'])  # noqa: E731
    s = cpe(x, H, W, sd, 'cpe.0.')
    y = ln(s, 'norm1').reshape(H, W, C)
    Hp, Wp = -(-H // window) * window, -(-W // window) * window
    padded = torch.zeros(Hp, Wp, C, dtype=x.dtype)
    padded[:H, :W] = y
    out = torch.zeros_like(padded)
    d = C // heads
    for wr in range(0, Hp, window):
        for wc in range(0, Wp, window):
            tokens = padded[wr:wr + window, wc:wc + window].reshape(-1, C)
            res = window_softmax_attention(tokens, sd['attn.qkv.weight'], sd['attn.qkv.bias'],
                                           sd['attn.proj.weight'], sd['attn.proj.bias'], heads, d ** -0.5, 1.0)
            out[wr:wr + window, wc:wc + window] = res.reshape(window, window, C)
    x = s + out[:H, :W].reshape(H * W, C)
    x = cpe(x, H, W, sd, 'cpe.1.')
    return x + mlp(ln(x, 'norm2'), sd, 'mlp.')


# ----------------------------------------------------------------------------- Visformer
def relative_bias(table: Tensor, window: int) -> Tensor:
    """(heads, w*w, w*w) from a ((2w-1)^2, heads) table: entry (i, j) is the table row of the offset
    (row_i - row_j, col_i - col_j), rows of the table ordered by (row offset, column offset)."""
    n = window * window
    heads = table.shape[1]
    out = torch.zeros(heads, n, n, dtype=table.dtype)
    for i in range(n):
        for j in range(n):
            dy = i // window - j // window + window - 1
            dx = i % window - j % window + window - 1
            out[:, i, j] = table[dy * (2 * window - 1) + dx]
    return out


def _band(pos: int, size: int, window: int, shift: int) -> int:
    """Swin region of a (rolled) row/column: [0, size-w) -> 0, [size-w, size-shift) -> 1, rest -> 2."""
    return 0 if pos < size - window else (1 if pos < size - shift else 2)


def visformer_attention(x: Tensor, sd: Dict[str, Tensor], prefix: str, heads: int, exponent: float,
                        window: Optional[int] = None, shift: int = 0) -> Tensor:
    """Visformer attention of one image's map x (C, H, W) -> (C, H, W); qkv/proj are 1x1 convs (no bias).
    q and k are each multiplied by head_dim ** exponent. ``window=None``: softmax over the whole map (v1).
    Otherwise (v2): the map rolled by -shift, split in windows; relative position bias from the table;
    -100 added where query and key lie in different regions of the rolled map; result rolled back."""
    C, H, W = x.shape
    qkv_w, proj_w = sd[prefix + 'qkv.weight'][:, :, 0, 0], sd[prefix + 'proj.weight'][:, :, 0, 0]
    d = qkv_w.shape[0] // 3 // heads
    s = d ** exponent
    if window is None:
        out = window_softmax_attention(_to_tokens(x), qkv_w, None, proj_w, None, heads, s, s)
        return _to_map(out, H, W)
    bias = relative_bias(sd[prefix + 'relative_position_bias_table'], window)
    out = torch.zeros(H, W, C, dtype=x.dtype)
    for wr in range(0, H, window):
        for wc in range(0, W, window):
            coords = [(wr + a, wc + b) for a in range(window) for b in range(window)]      # rolled positions
            source = [((r + shift) % H, (c + shift) % W) for r, c in coords]                # original positions
            tokens = torch.stack([x[:, r, c] for r, c in source])
            full = bias.clone()
            if shift:
                region = [3 * _band(r, H, window, shift) + _band(c, W, window, shift) for r, c in coords]
                for i in range(len(coords)):
                    for j in range(len(coords)):
                        if region[i] != region[j]:
                            full[:, i, j] -= 100.0
            res = window_softmax_attention(tokens, qkv_w, None, proj_w, None, heads, s, s, full)
            for t, (r, c) in enumerate(source):
                out[r, c] = res[t]
    return out.permute(2, 0, 1)


def visformer_mlp(x: Tensor, sd: Dict[str, Tensor], prefix: str, group: int = 8) -> Tensor:
    """conv1 (1x1) -> GELU -> [grouped 3x3 conv -> GELU] -> conv3 (1x1), no biases; x (C, H, W)."""
    y = gelu(pointwise(x, sd[prefix + 'conv1.weight']))
    if prefix + 'conv2.weight' in sd:
        y = gelu(conv2d(y, sd[prefix + 'conv2.weight'], None, padding=1, groups=group))
    return pointwise(y, sd[prefix + 'conv3.weight'])


def visformer_block(x: Tensor, sd: Dict[str, Tensor], heads: int, exponent: float, window: Optional[int] = None,
                    shift: int = 0, group: int = 8) -> Tensor:
    """One Visformer block (eval) on one image's map x (C, H, W), weights from the block's state_dict."""
    if 'norm1.bn.weight' in sd:
        y = batch_norm_eval(x, *bn_params(sd, 'norm1.bn.'))
        x = x + visformer_attention(y, sd, 'attn.', heads, exponent, window, shift)
    return x + visformer_mlp(batch_norm_eval(x, *bn_params(sd, 'norm2.bn.')), sd, 'mlp.', group)
