"""Data pipeline: ImageNet-layout datasets (folder or zip), transforms, samplers, Mixup/CutMix."""
from .build import (ImageFolderDataset, build_mixup, build_train_loader, build_transform,  # noqa: F401
                    build_val_loader, check_class_lists, check_data_path, check_images_open, check_num_classes, stop_loader_workers,
                    patch_randaugment_posterize)
