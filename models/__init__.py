"""Model zoo: ``build_model(config)`` for the FLatten-Swin, -PVT, -PVTv2 and -CSwin families."""
from .build import build_model, model_types, register_model
from . import flatten_swin, flatten_pvt, flatten_pvt_v2, flatten_cswin  # noqa: F401  (registration)
from . import l2vit, visformer  # noqa: F401  (registration: L2ViT, Visformer v1/v2)
from . import dat  # noqa: F401  (registration: DAT++)

__all__ = ['build_model', 'model_types', 'register_model']
