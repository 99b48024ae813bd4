"""The one fvcore handle a FLOP count may need: torch's fused attention as its two matmuls.

fvcore (0.1.5, its last release) has no handle for ``aten::scaled_dot_product_attention``: it skips the op
with an "unsupported operator" warning, so the QK^T and AV of a model that calls the fused op count 0.
The models of this repository need nothing: while traced, their fast paths run plain operators and their
softmax blocks compute explicit probabilities, so plain ``FlopCountAnalysis(model, x).total()`` gives the
official counts. Other models (timm's own Swin, ViT, ...) take the handle::

    from fvcore.nn import FlopCountAnalysis
    from models.flops import FVCORE_HANDLES
    flops = FlopCountAnalysis(model.eval(), x).set_op_handle(**FVCORE_HANDLES).total()

One multiply-add counts as one flop (fvcore's convention, and that of the FLatten, Swin, PVT, CSwin, DAT
and L2ViT papers). ``torch.utils.flop_counter.FlopCounterMode`` prices the fused op itself on CUDA; it
counts 2 flops per multiply-add (tests/test_flops.py compares the two counters).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

__all__ = ['sdpa_flop_jit', 'FVCORE_HANDLES']


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle: q (..., L, E), k (..., S, E), v (..., S, Ev) -> L*S*E (QK^T) + L*S*Ev (AV) multiply-adds
    per batch-and-head entry of the output (..., L, Ev). Mask, scale and softmax are element-wise: not counted
    (fvcore's convention for explicit attention too)."""
    q, k = (v.type().sizes() for v in inputs[:2])
    out = outputs[0].type().sizes()
    length, source, e_qk, e_v = q[-2], k[-2], q[-1], out[-1]
    return math.prod(out[:-2]) * length * source * (e_qk + e_v)


# {op name: handle} for ``FlopCountAnalysis.set_op_handle(**FVCORE_HANDLES)``
FVCORE_HANDLES: Dict[str, Any] = {'aten::scaled_dot_product_attention': sdpa_flop_jit}
