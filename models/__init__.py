"""Model library: every family registers its models in timm (``timm.create_model('flatten_swin_t')``
after ``import models``) and declares its config section and adapter (``build_model(config)``)."""
from .config_adapter import build_model, model_spec, model_types
from . import flatten_swin, flatten_pvt, flatten_pvt_v2, flatten_cswin  # noqa: F401  (registration)
from . import l2vit, visformer  # noqa: F401  (registration: L2ViT, Visformer v1/v2)
from . import dat  # noqa: F401  (registration: DAT++)
from . import flatten_deit  # noqa: F401  (registration: FLatten-DeiT-T)
from .attention_convert import convert_attention

__all__ = ['build_model', 'model_spec', 'model_types', 'convert_attention']
