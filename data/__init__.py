"""Data pipeline: ImageNet-layout datasets (folder or zip), transforms, samplers, Mixup/CutMix."""
from .build import (build_mixup, build_train_loader, build_transform, build_val_loader,  # noqa: F401
                    check_data_path, check_num_classes)
from .cached_image_folder import DataError  # noqa: F401
