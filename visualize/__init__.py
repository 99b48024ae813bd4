"""Attention visualisation without model edits: capture (hooks on each attention module's ``tap``),
layout (tokens back to image positions), render (PNG overlays and grids); ``python -m visualize``."""
from .capture import (AttentionMaps, AttentionSite, Capture, SelectionError, attention_maps, attention_sites,
                      capture, dwc_matrix, linear_attention_matrix, query_lattice, select_site)
from .layout import LayoutError, TokenLayout, token_layout

__all__ = ['AttentionMaps', 'AttentionSite', 'Capture', 'LayoutError', 'SelectionError', 'TokenLayout',
           'attention_maps', 'attention_sites', 'capture', 'dwc_matrix', 'linear_attention_matrix',
           'query_lattice', 'select_site', 'token_layout']
