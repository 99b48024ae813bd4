"""Published ImageNet-1K top-1 (224 px) of the models in the FLatten paper's speed figure (Sec. 5.5, Fig. 7),
each with where it is printed, and how this repository builds the model that is timed for it.

One table, read by tools/latency.py. ``top1`` is None where no number is printed in a source available
here (FLatten-PVT-M/B are appendix-only): such models are timed but not placed on the accuracy curve.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

FLATTEN_TABLE = 'FLatten Transformer (Han et al., ICCV 2023), table of Fig. 6'
FLATTEN_README = 'LeapLabTHU/FLatten-Transformer README, "Pretrained Models"'
PVT_PAPER = 'PVT (Wang et al., ICCV 2021), Table 2'
SWIN_PAPER = 'Swin Transformer (Liu et al., ICCV 2021), Table 1(a)'


@dataclass(frozen=True)
class Published:
    """One model of Fig. 7: ``family`` 'pvt' | 'swin'; ``kind`` 'flatten' | 'softmax'; ``spec`` what
    tools/benchmark.load_cfg builds (a config path or ``timm:<name>``)."""
    name: str
    family: str
    kind: str
    top1: Optional[float]
    source: str
    spec: str


TABLE: List[Published] = [
    Published('FLatten-PVT-T', 'pvt', 'flatten', 77.8, FLATTEN_TABLE + '; ' + FLATTEN_README, 'cfgs/flatten_pvt_t.yaml'),
    Published('FLatten-PVT-S', 'pvt', 'flatten', 81.7, FLATTEN_TABLE, 'cfgs/flatten_pvt_s.yaml'),
    Published('FLatten-PVT-M', 'pvt', 'flatten', None, 'appendix only (not available here)', 'cfgs/flatten_pvt_m.yaml'),
    Published('FLatten-PVT-B', 'pvt', 'flatten', None, 'appendix only (not available here)', 'cfgs/flatten_pvt_b.yaml'),
    # the original (all-softmax, spatial-reduction) PVT as this repository builds it (weights map 1:1 to
    # the PVT release); PVT-L is configured as cfgs/pvt_b.yaml
    Published('PVT-T', 'pvt', 'softmax', 75.1, PVT_PAPER, 'cfgs/pvt_t.yaml'),
    Published('PVT-S', 'pvt', 'softmax', 79.8, PVT_PAPER, 'cfgs/pvt_s.yaml'),
    Published('PVT-M', 'pvt', 'softmax', 81.2, PVT_PAPER, 'cfgs/pvt_m.yaml'),
    Published('PVT-L', 'pvt', 'softmax', 81.7, PVT_PAPER, 'cfgs/pvt_b.yaml'),
    Published('FLatten-Swin-T', 'swin', 'flatten', 82.1, FLATTEN_TABLE + '; ' + FLATTEN_README,
              'cfgs/flatten_swin_t.yaml'),
    Published('FLatten-Swin-S', 'swin', 'flatten', 83.5, FLATTEN_TABLE + '; ' + FLATTEN_README,
              'cfgs/flatten_swin_s.yaml'),
    Published('FLatten-Swin-B', 'swin', 'flatten', 83.8, FLATTEN_TABLE + '; ' + FLATTEN_README,
              'cfgs/flatten_swin_b.yaml'),
    # Swin as its users run it: timm's implementation
    Published('Swin-T', 'swin', 'softmax', 81.3, SWIN_PAPER, 'timm:swin_tiny_patch4_window7_224'),
    Published('Swin-S', 'swin', 'softmax', 83.0, SWIN_PAPER, 'timm:swin_small_patch4_window7_224'),
    Published('Swin-B', 'swin', 'softmax', 83.5, SWIN_PAPER, 'timm:swin_base_patch4_window7_224'),
]

# The paper's CPU speed-ups at equal accuracy (Sec. 5.5, Intel i5-8265U), per family.
PAPER_CPU_SPEEDUP = {'pvt': 2.1, 'swin': 2.0}
