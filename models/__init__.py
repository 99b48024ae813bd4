"""Model library: every family registers its models in timm (``timm.create_model('flatten_swin_t')``
after ``import models``) and a config adapter (``build_model(config)``)."""
from .build import build_model, check_config_keys, load_pretrained, model_types, model_spec
from . import flatten_swin, flatten_pvt, flatten_pvt_v2, flatten_cswin  # noqa: F401  (registration)
from . import l2vit, visformer  # noqa: F401  (registration: L2ViT, Visformer v1/v2)
from . import dat  # noqa: F401  (registration: DAT++)

__all__ = ['build_model', 'check_config_keys', 'load_pretrained', 'model_spec', 'model_types']
