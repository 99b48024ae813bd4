"""Experiment configuration: yacs defaults, YAML files with ``BASE`` inheritance, ``--opts`` overrides.

Public entry points:
  * ``load_config(cfg_path, opts=None)`` -> frozen CfgNode (tests, scripts, tools).
  * ``get_config(args)`` -> frozen CfgNode for ``main.py`` (applies the command-line flags too).
  * ``validate_config(config)`` -> raises ``ConfigError`` with a one-line message naming key and fix.

The experiment keys of the official Swin-codebase config live here (keys that are new in this codebase are
marked "(ours)"); the model keys are declared by each model family next to its models (its official
config section) and by ``models/config_adapter.py`` (any timm model: MODEL.TYPE, MODEL.KWARGS).
"""
from __future__ import annotations

import ast
import os
from typing import Any, Iterable, Optional, Sequence

import yaml
from yacs.config import CfgNode as CN


from errors import ConfigError  # noqa: E402,F401  (re-exported: ``from config import ConfigError``)


_C = CN()
_C.BASE = ['']

# ----------------------------------------------------------------------------- data
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128                 # per process
_C.DATA.DATA_PATH = ''
_C.DATA.DATASET = 'imagenet'
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = 'bicubic'        # random, bilinear, bicubic
_C.DATA.ZIP_MODE = False
_C.DATA.CACHE_MODE = 'part'              # no, full, part (zip mode only)
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
_C.DATA.SKIP_BAD_IMAGES = False          # (ours) skip and count unreadable images instead of failing
_C.DATA.PERSISTENT_WORKERS = True        # (ours) keep DataLoader workers alive between epochs

# ----------------------------------------------------------------------------- model
_C.MODEL = CN()
_C.MODEL.TYPE = 'flatten_swin'              # a registered type (the official default 'swin' builds nothing here)
_C.MODEL.NAME = 'swin_tiny_patch4_window7_224'
_C.MODEL.RESUME = ''
_C.MODEL.PRETRAINED = ''                 # (ours) set by --pretrained
_C.MODEL.USE_EMA_WEIGHTS = False         # (ours) --ema: read 'model_ema' of --pretrained / evaluated checkpoints
_C.MODEL.PRETRAINED_22K_TO_1K = ''       # (ours) text file of 1000 class indices mapping a 21841-class head
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1

_C.MODEL.IN_CHANS = 3                    # (ours) input channels of a stock timm model (families: their section);
                                         # 1: the data pipeline gives grayscale (BT.601 luma) images
# (ours) keyword arguments passed to timm.create_model as they are (any MODEL.TYPE), e.g. to shrink a stock
# timm model: KWARGS: {embed_dim: 32, depths: [1, 1, 2, 1]}. An entry that sets the same model argument as
# a key above (MODEL.NUM_CLASSES, MODEL.SWIN.EMBED_DIM, ...) with another value is a ConfigError naming both;
# with KWARGS set the model is built (and run on one image) when the config is loaded, so a bad value fails then.
_C.MODEL.KWARGS = CN(new_allowed=True)
# (ours) '' = the model's own attention; 'focused_linear' converts the attention of a timm ViT-style model
# (models.convert_attention; options MODEL.LA.FOCUSING_FACTOR / KERNEL_SIZE / BLOCKS / DWC / FOCUSED)
_C.MODEL.ATTENTION = ''
# Each model family declares its own section (MODEL.<SECTION>: the keys of its official configs) next to
# its models; default_config() adds them (models/config_adapter.py: ConfigSection).

# ----------------------------------------------------------------------------- training
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.COOLDOWN_EPOCHS = 0
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0                 # None disables clipping
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.USE_CHECKPOINT = False          # gradient checkpointing
_C.TRAIN.MAX_NONFINITE_STEPS = 20        # (ours) consecutive skipped steps before the run stops
_C.TRAIN.KEEP_CHECKPOINTS = 3            # (ours) epoch checkpoints kept on disk
# Gradient accumulation (L2ViT/ConvNeXt `update_freq`): the loss is divided by k and the optimizer steps,
# zeroes the gradients and updates the EMA every k micro-batches; schedules count optimizer steps.
# 0 and 1 both mean no accumulation (the official Swin default is 0).
_C.TRAIN.ACCUMULATION_STEPS = 1
# Learning-rate scaling: 'linear' multiplies BASE_LR, WARMUP_LR and MIN_LR by the total batch
# (BATCH_SIZE x world size x ACCUMULATION_STEPS) / LR_SCALE_BATCH (Swin/FLatten/DeiT/Visformer);
# 'none' uses them as given (absolute, ConvNeXt/L2ViT).
_C.TRAIN.LR_SCALING = 'linear'           # (ours) linear, none
_C.TRAIN.LR_SCALE_BATCH = 512            # (ours) reference total batch of the linear rule
_C.TRAIN.SYNC_BN = False                 # (ours) convert BatchNorm layers to SyncBatchNorm under DDP
_C.TRAIN.COMPILE = False                 # (ours) torch.compile the model: training step, --eval, --throughput
_C.TRAIN.CHANNELS_LAST = False           # (ours) channels_last memory format for model and images

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'    # cosine, linear, step
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'adamw'        # adamw, sgd
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9
# (ours) also exempt what the model lists in extra_no_weight_decay() from weight decay (the model library
# decides: e.g. the focused attention's scales and positional encodings); off = the official groups.
_C.TRAIN.OPTIMIZER.EXTRA_NO_WEIGHT_DECAY = False

# ----------------------------------------------------------------------------- augmentation
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = 'pixel'
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = 'batch'
_C.AUG.HFLIP = 0.5                       # (ours) horizontal flip probability (timm default)
_C.AUG.SCALE = (0.08, 1.0)               # (ours) random-resized-crop area range (timm default)
# (ours) repeated augmentation (DeiT's RASampler, Visformer's recipe): the shuffled order lists each image
# REPEATED_AUG_COUNT times in a row (independent augmentations), dealt to the ranks in turn; each rank's
# epoch is cut to floor(N / 256) * 256 / ranks samples, so an epoch covers about 1/COUNT of the N images.
_C.AUG.REPEATED_AUG = False
_C.AUG.REPEATED_AUG_COUNT = 3

# ----------------------------------------------------------------------------- testing
_C.TEST = CN()
_C.TEST.CROP = True
_C.TEST.CROP_PCT = 0.875                 # (ours) eval resize to IMG_SIZE / CROP_PCT, then centre crop
# (ours) at IMG_SIZE >= this, evaluation resizes straight to IMG_SIZE x IMG_SIZE without cropping
# (ConvNeXt/L2ViT: 384); 0 = never
_C.TEST.NO_CROP_MIN_SIZE = 0
# (ours) resize the shorter side to IMG_SIZE / CROP_PCT keeping the aspect ratio (DeiT/Visformer,
# ConvNeXt/L2ViT) instead of the official FLatten/Swin square resize
_C.TEST.RESIZE_SHORT_SIDE = False

# ----------------------------------------------------------------------------- EMA (ours: one loop)
_C.MODEL_EMA = CN()
_C.MODEL_EMA.ENABLE = False
_C.MODEL_EMA.DECAY = 0.99996
_C.MODEL_EMA.FORCE_CPU = False

# ----------------------------------------------------------------------------- misc
_C.AMP = False
_C.AMP_DTYPE = 'float16'                 # (ours) float16 (with GradScaler) or bfloat16
_C.DEVICE = 'auto'                       # (ours) auto, cuda, cpu
_C.DIST_TIMEOUT = 600                    # (ours) seconds a collective waits before the run fails
_C.OUTPUT = ''
_C.TAG = 'default'
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 100
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.FIND_UNUSED_PARAMS = False            # (ours) set by --find-unused-params
_C.TENSORBOARD = False                   # (ours) set by --tensorboard: also write TensorBoard event files

def default_config() -> CN:
    """A mutable copy of the defaults: the experiment keys above plus the config section every model family
    declares (models/config_adapter.py: ``ConfigSection``)."""
    from models.config_adapter import config_sections
    import models  # noqa: F401  (local: the families declare their sections on import)

    config = _C.clone()
    config.defrost()
    for section in config_sections():
        node = CN(new_allowed=section.open)
        for key in section.keys:
            node[key.name] = key.default
        config.MODEL[section.name] = node
    return config


def _coerce(full_key: str, value: Any, original: Any, source: str) -> Any:
    if isinstance(original, str) and isinstance(value, int) and not isinstance(value, bool):
        return str(value)                 # a text key written as digits in YAML (e.g. 8421)
    if value is None or original is None:
        return value
    if isinstance(original, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(original)(value)
    if isinstance(original, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is type(original):
        return value
    raise ConfigError(
        f"{source}: {full_key} must be {type(original).__name__} like {original!r}, got {value!r}")


def _decode(value: Any) -> Any:
    """Turn strings such as '1e-4', 'None', '[1, 2]' into Python values (as yacs does)."""
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def _merge(config: CN, updates: dict, source: str, prefix: str = '') -> None:
    for key, value in updates.items():
        full_key = f'{prefix}{key}'
        if key not in config:
            if getattr(config, '__dict__', {}).get(CN.NEW_ALLOWED, False):
                config[key] = CN(value) if isinstance(value, dict) else _decode(value)
                continue
            raise ConfigError(f"{source}: unknown config key '{full_key}' (check its spelling; "
                              f"valid keys here: {', '.join(sorted(config.keys()))})")
        original = config[key]
        if isinstance(original, CN):
            if isinstance(value, str):            # --opts MODEL.KWARGS "{embed_dim: 32, depths: [1, 1]}"
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    pass
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{full_key}' is a section; give it sub-keys, not {value!r}")
            _merge(original, value, source, full_key + '.')
        else:
            config[key] = _coerce(full_key, _decode(value), original, source)


def merge_yaml(config: CN, cfg_path: str) -> None:
    """Merge a YAML file into ``config`` after its BASE files (paths relative to the YAML file)."""
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"config file not found: '{cfg_path}' (give --cfg a path to a YAML file, e.g. cfgs/flatten_swin_t.yaml)")
    with open(cfg_path, 'r') as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{cfg_path}: {_yaml_problem(e)}; fix the YAML syntax there") from None
    if data is None:       # empty, or comments only: silently training the defaults would surprise
        raise ConfigError(f"{cfg_path} is empty (no KEY: value); write the settings there (e.g. BASE: "
                          f"['../flatten_swin_t.yaml'] and what differs), or give --cfg the file you meant")
    if not isinstance(data, dict):
        raise ConfigError(f"{cfg_path}: a config file must be a mapping of KEY: value")
    bases = data.pop('BASE', None) or []
    if isinstance(bases, str):
        bases = [bases]
    for base in bases:
        if base:
            base_path = os.path.join(os.path.dirname(os.path.abspath(cfg_path)), base)
            if not os.path.isfile(base_path):
                raise ConfigError(f"{cfg_path}: its BASE file '{base}' does not exist (looked for {base_path}); "
                                  f"fix the BASE: entry of {cfg_path} (paths are relative to that file)")
            merge_yaml(config, base_path)
    _merge(config, data, cfg_path)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """'line L column C: <problem>' (1-based, where PyYAML located the error) for a YAML syntax error."""
    mark = getattr(e, 'problem_mark', None) or getattr(e, 'context_mark', None)
    problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
    context, start = getattr(e, 'context', None), getattr(e, 'context_mark', None)
    if mark is None:
        return f"not valid YAML ({problem})"
    text = f"not valid YAML at line {mark.line + 1} column {mark.column + 1}: {problem}"
    if context and start is not None and start.line != mark.line:
        text += f" ({context} at line {start.line + 1})"
    return text


def merge_opts(config: CN, opts: Optional[Sequence[str]]) -> None:
    """Merge ``['KEY.SUB', 'value', ...]`` pairs (the ``--opts`` list)."""
    if not opts:
        return
    if len(opts) % 2:
        raise ConfigError(f"--opts takes KEY VALUE pairs; got an odd count: {list(opts)}")
    for key, value in zip(opts[0::2], opts[1::2]):
        nested: dict = {}
        node = nested
        parts = key.split('.')
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        _merge(config, nested, '--opts')


def load_config(cfg_path: str, opts: Optional[Iterable[str]] = None, validate: bool = True) -> CN:
    """Defaults <- YAML (with BASE chain) <- opts; validated and frozen."""
    config = default_config()
    merge_yaml(config, cfg_path)
    merge_opts(config, list(opts) if opts else None)
    resolve_config(config)
    if validate:
        validate_config(config)
    config.freeze()
    return config


def get_config(args) -> CN:
    """The config for main.py: ``load_config`` plus the command-line flags, and the output folder
    ``<output>/<MODEL.NAME>/<TAG>``."""
    config = default_config()
    merge_yaml(config, args.cfg)
    merge_opts(config, getattr(args, 'opts', None))
    flag_to_key = [
        ('batch_size', 'DATA.BATCH_SIZE'), ('data_path', 'DATA.DATA_PATH'), ('cache_mode', 'DATA.CACHE_MODE'),
        ('resume', 'MODEL.RESUME'), ('pretrained', 'MODEL.PRETRAINED'), ('output', 'OUTPUT'), ('tag', 'TAG'),
        ('amp_dtype', 'AMP_DTYPE'), ('device', 'DEVICE'),
        ('model_ema_decay', 'MODEL_EMA.DECAY'),
    ]
    for flag, key in flag_to_key:
        value = getattr(args, flag, None)
        if value is not None:
            _set(config, key, value)
    switches = [('zip', 'DATA.ZIP_MODE'), ('use_checkpoint', 'TRAIN.USE_CHECKPOINT'), ('amp', 'AMP'),
                ('eval', 'EVAL_MODE'), ('throughput', 'THROUGHPUT_MODE'), ('model_ema', 'MODEL_EMA.ENABLE'),
                ('model_ema_force_cpu', 'MODEL_EMA.FORCE_CPU'), ('find_unused_params', 'FIND_UNUSED_PARAMS'),
                ('tensorboard', 'TENSORBOARD'), ('ema', 'MODEL.USE_EMA_WEIGHTS'), ('compile', 'TRAIN.COMPILE')]
    for flag, key in switches:
        if getattr(args, flag, False):
            _set(config, key, True)
    config.OUTPUT = os.path.join(config.OUTPUT or 'output', config.MODEL.NAME, config.TAG)
    resolve_config(config)
    for key, flag in (('RESUME', '--resume'), ('PRETRAINED', '--pretrained')):   # before any data or model work
        path = config.MODEL[key]
        if path and not os.path.isfile(path):
            raise ConfigError(f"{flag} {path}: no such file (MODEL.{key}); give the path of a checkpoint (.pth)")
    validate_config(config)
    config.freeze()
    return config


def resolve_config(config: CN) -> None:
    """In place, before validation: a placeholder path in angle brackets (an official YAML ships e.g.
    ``PRETRAINED: "<path-to-weights.pth>"``) counts as unset (``--pretrained PATH`` sets a real one); then each
    model family's own reconciliation of its section (models/config_adapter.py: ``ConfigSection.resolve``)."""
    from models.config_adapter import resolve_sections

    for key in ('PRETRAINED', 'RESUME'):
        value = config.MODEL[key]
        if isinstance(value, str) and value.startswith('<') and value.endswith('>'):
            config.MODEL[key] = ''
    resolve_sections(config, _C)


def _set(config: CN, key: str, value: Any) -> None:
    node = config
    parts = key.split('.')
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- validation
def validate_config(config: CN) -> None:
    """Cheap checks that fail before any work, each with one line naming the key and the fix. The model
    keys are checked by the model layer (``models.config_adapter.validate_model_config``: each family's declared
    key checks and layout checks, an unknown MODEL.TYPE with the closest registered names)."""
    if config.DATA.BATCH_SIZE <= 0:
        raise ConfigError(f"DATA.BATCH_SIZE must be positive, got {config.DATA.BATCH_SIZE} "
                          f"(set --batch-size N or --opts DATA.BATCH_SIZE N)")
    mixup_on = config.AUG.MIXUP > 0 or config.AUG.CUTMIX > 0 or config.AUG.CUTMIX_MINMAX is not None
    if mixup_on and config.DATA.BATCH_SIZE % 2 and not (config.EVAL_MODE or config.THROUGHPUT_MODE):
        raise ConfigError(f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} is odd but Mixup/CutMix (AUG.MIXUP "
                          f"{config.AUG.MIXUP}, AUG.CUTMIX {config.AUG.CUTMIX}) mix pairs of images; use an even "
                          f"--batch-size or turn them off with --opts AUG.MIXUP 0 AUG.CUTMIX 0")
    if config.DATA.IMG_SIZE <= 0:
        raise ConfigError(f"DATA.IMG_SIZE must be positive, got {config.DATA.IMG_SIZE}")
    if config.MODEL.NUM_CLASSES <= 0:
        raise ConfigError(f"MODEL.NUM_CLASSES must be positive, got {config.MODEL.NUM_CLASSES}")
    from models.config_adapter import validate_model_config
    validate_model_config(config, _C)    # the family's keys, an unknown MODEL.TYPE, keys of another type, ...
    from models.config_adapter import input_channels
    channels, key = input_channels(config)
    if channels not in (1, 3):
        raise ConfigError(f"{key} {channels}: the data pipeline gives RGB (3) or grayscale (1) images; set 3 or 1")
    if config.AMP_DTYPE not in ('float16', 'bfloat16'):
        raise ConfigError(f"AMP_DTYPE must be 'float16' or 'bfloat16', got {config.AMP_DTYPE!r}")
    if config.DEVICE not in ('auto', 'cuda', 'cpu'):
        raise ConfigError(f"DEVICE must be 'auto', 'cuda' or 'cpu', got {config.DEVICE!r}")
    if config.DATA.CACHE_MODE not in ('no', 'full', 'part'):
        raise ConfigError(f"DATA.CACHE_MODE must be 'no', 'full' or 'part', got {config.DATA.CACHE_MODE!r}")
    if config.TRAIN.LR_SCHEDULER.NAME not in ('cosine', 'linear', 'step'):
        raise ConfigError(f"TRAIN.LR_SCHEDULER.NAME must be 'cosine', 'linear' or 'step', got "
                          f"{config.TRAIN.LR_SCHEDULER.NAME!r}")
    if config.TRAIN.OPTIMIZER.NAME.lower() not in ('adamw', 'sgd'):
        raise ConfigError(f"TRAIN.OPTIMIZER.NAME must be 'adamw' or 'sgd', got {config.TRAIN.OPTIMIZER.NAME!r}")
    if config.TRAIN.EPOCHS <= 0:
        raise ConfigError(f"TRAIN.EPOCHS must be positive, got {config.TRAIN.EPOCHS}")
    if config.TRAIN.ACCUMULATION_STEPS < 0:
        raise ConfigError(f"TRAIN.ACCUMULATION_STEPS must be >= 1 (0 also means 1), got {config.TRAIN.ACCUMULATION_STEPS}")
    if config.TRAIN.LR_SCALING not in ('linear', 'none'):
        raise ConfigError(f"TRAIN.LR_SCALING must be 'linear' (lr x total batch / TRAIN.LR_SCALE_BATCH) or 'none' "
                          f"(absolute lr), got {config.TRAIN.LR_SCALING!r}")
    if config.TRAIN.LR_SCALE_BATCH <= 0:
        raise ConfigError(f"TRAIN.LR_SCALE_BATCH must be positive, got {config.TRAIN.LR_SCALE_BATCH}")
    if config.AUG.REPEATED_AUG and config.AUG.REPEATED_AUG_COUNT < 1:
        raise ConfigError(f"AUG.REPEATED_AUG_COUNT must be >= 1, got {config.AUG.REPEATED_AUG_COUNT}")
    if not 0 < config.TEST.CROP_PCT <= 1:
        raise ConfigError(f"TEST.CROP_PCT must be in (0, 1], e.g. 0.875, got {config.TEST.CROP_PCT}")
