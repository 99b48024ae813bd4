"""Attention visualisation without model edits: capture (hooks on each attention module's ``tap``),
layout (tokens back to image positions), render (PNG overlays and grids); ``python -m visualize``."""
from errors import InputError, LayoutError, SelectionError

from .capture import (AttentionMaps, AttentionSite, Capture, attention_maps, attention_sites, capture, dwc_matrix,
                      linear_attention_matrix, list_sites, query_lattice, select_site)
from .layout import token_layout
from .photo import load_photo, to_input

__all__ = ['AttentionMaps', 'AttentionSite', 'Capture', 'InputError', 'LayoutError', 'SelectionError',
           'attention_maps', 'attention_sites', 'capture', 'dwc_matrix', 'linear_attention_matrix', 'list_sites',
           'load_photo', 'query_lattice', 'select_site', 'to_input', 'token_layout']
