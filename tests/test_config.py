"""config.py: YAML + BASE inheritance, --opts, type coercion and one-line errors."""
import glob
import os
import textwrap

import pytest

from config import ConfigError, load_config
from models import build_model, model_types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(ROOT, 'cfgs', '**', '*.yaml'), recursive=True))


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(textwrap.dedent(text))
    return str(path)


def test_base_inheritance_relative_to_yaml(tmp_path):
    write(tmp_path / 'bases' / 'root.yaml', """\
        DATA:
          IMG_SIZE: 448
          BATCH_SIZE: 16
        TRAIN:
          EPOCHS: 7
        """)
    write(tmp_path / 'bases' / 'mid.yaml', """\
        BASE: ['root.yaml']
        DATA:
          BATCH_SIZE: 32
        MODEL:
          NAME: mid
        """)
    child = write(tmp_path / 'exp' / 'child.yaml', """\
        BASE: ['../bases/mid.yaml']
        MODEL:
          NAME: child
        """)
    cwd = os.getcwd()
    os.chdir(ROOT)                          # BASE must resolve against the YAML, not the working dir
    try:
        c = load_config(child)
    finally:
        os.chdir(cwd)
    assert c.DATA.IMG_SIZE == 448           # from root
    assert c.DATA.BATCH_SIZE == 32          # mid overrides root
    assert c.TRAIN.EPOCHS == 7
    assert c.MODEL.NAME == 'child'          # child overrides mid
    assert c.TRAIN.WARMUP_EPOCHS == 20      # untouched default
    assert c.is_frozen()


def test_opts_override_yaml(tmp_path):
    cfg = write(tmp_path / 'a.yaml', "DATA:\n  IMG_SIZE: 448\nTRAIN:\n  BASE_LR: 1e-3\n")
    c = load_config(cfg, ['DATA.IMG_SIZE', '224', 'TRAIN.BASE_LR', '2e-4', 'MODEL.SWIN.DEPTHS', '[1, 1, 2, 1]',
                          'MODEL.LA.ATTN_TYPE', 'LLSS', 'AMP', 'True'])
    assert c.DATA.IMG_SIZE == 224 and isinstance(c.DATA.IMG_SIZE, int)
    assert c.TRAIN.BASE_LR == pytest.approx(2e-4) and isinstance(c.TRAIN.BASE_LR, float)
    assert list(c.MODEL.SWIN.DEPTHS) == [1, 1, 2, 1]
    assert c.MODEL.LA.ATTN_TYPE == 'LLSS'
    assert c.AMP is True


def test_yaml_scientific_notation_is_a_float(tmp_path):
    # PyYAML reads '1e-3' (no dot) as a string; it must still become the float 0.001
    c = load_config(write(tmp_path / 'a.yaml', "TRAIN:\n  BASE_LR: 1e-3\n  WEIGHT_DECAY: 5e-2\n"))
    assert isinstance(c.TRAIN.BASE_LR, float) and c.TRAIN.BASE_LR == pytest.approx(1e-3)
    assert c.TRAIN.WEIGHT_DECAY == pytest.approx(0.05)


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    cfg = write(tmp_path / 'typo.yaml', "MODEL:\n  SWIN:\n    EMBED_DIMS: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    msg = str(e.value)
    assert 'MODEL.SWIN.EMBED_DIMS' in msg and 'typo.yaml' in msg
    assert '\n' not in msg


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    write(tmp_path / 'base.yaml', "TRAIN:\n  EPOCH: 3\n")
    cfg = write(tmp_path / 'child.yaml', "BASE: ['base.yaml']\n")
    with pytest.raises(ConfigError, match=r'base\.yaml.*TRAIN\.EPOCH'):
        load_config(cfg)


def test_unknown_key_in_opts(tmp_path):
    cfg = write(tmp_path / 'a.yaml', "{}\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg, ['TRAIN.BASELR', '1e-3'])
    assert 'TRAIN.BASELR' in str(e.value) and '--opts' in str(e.value)
    with pytest.raises(ConfigError):
        load_config(cfg, ['DATA.IMG_SIZE'])            # odd count: a key without a value


@pytest.mark.parametrize('yaml_text,key', [
    ("DATA:\n  IMG_SIZE: big\n", 'DATA.IMG_SIZE'),
    ("DATA:\n  IMG_SIZE: 22.5\n", 'DATA.IMG_SIZE'),
    ("MODEL:\n  SWIN:\n    DEPTHS: 4\n", 'MODEL.SWIN.DEPTHS'),
    ("AMP: 3\n", 'AMP'),
    ("MODEL: 3\n", 'MODEL'),
])
def test_wrong_type(tmp_path, yaml_text, key):
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        load_config(write(tmp_path / 'a.yaml', yaml_text))


def test_wrong_type_in_opts(tmp_path):
    with pytest.raises(ConfigError, match=r'DATA\.BATCH_SIZE'):
        load_config(write(tmp_path / 'a.yaml', "{}\n"), ['DATA.BATCH_SIZE', 'many'])


def test_unknown_model_type_lists_valid_types(tmp_path):
    with pytest.raises(ConfigError) as e:          # at load time, before any work
        load_config(write(tmp_path / 'a.yaml', "MODEL:\n  TYPE: flaten_swin\n"))
    msg = str(e.value)
    assert 'flaten_swin' in msg
    assert 'flatten_swin' in model_types()
    for t in model_types():
        assert t in msg


@pytest.mark.parametrize('attn', ['LLS', 'LLSSS', 'LLXS', 'llss', ''])
def test_attn_type_must_be_one_letter_per_stage(tmp_path, attn):
    cfg = write(tmp_path / 'a.yaml', "MODEL:\n  TYPE: flatten_swin\n")
    with pytest.raises(ConfigError, match='ATTN_TYPE'):
        load_config(cfg, ['MODEL.LA.ATTN_TYPE', attn])


def test_attn_type_follows_number_of_swin_stages(tmp_path):
    cfg = write(tmp_path / 'a.yaml', "MODEL:\n  TYPE: flatten_swin\n  SWIN:\n    DEPTHS: [2, 2, 2]\n"
                                     "    NUM_HEADS: [1, 2, 4]\n  LA:\n    ATTN_TYPE: LLS\n")
    assert load_config(cfg).MODEL.LA.ATTN_TYPE == 'LLS'
    with pytest.raises(ConfigError, match='ATTN_TYPE'):
        load_config(cfg, ['MODEL.LA.ATTN_TYPE', 'LLSS'])


def test_sr_ratios_int_becomes_string(tmp_path):
    c = load_config(write(tmp_path / 'a.yaml', "MODEL:\n  LA:\n    PVT_LA_SR_RATIOS: 8421\n"))
    assert c.MODEL.LA.PVT_LA_SR_RATIOS == '8421'
    c = load_config(write(tmp_path / 'b.yaml', "{}\n"), ['MODEL.LA.PVT_LA_SR_RATIOS', '1111'])
    assert c.MODEL.LA.PVT_LA_SR_RATIOS == '1111'
    with pytest.raises(ConfigError, match='PVT_LA_SR_RATIOS'):
        load_config(write(tmp_path / 'c.yaml', "MODEL:\n  LA:\n    PVT_LA_SR_RATIOS: 8420\n"))
    with pytest.raises(ConfigError, match='PVT_LA_SR_RATIOS'):
        load_config(write(tmp_path / 'd.yaml', "MODEL:\n  LA:\n    PVT_LA_SR_RATIOS: 842\n"))


@pytest.mark.parametrize('spelling', ['None', 'null', '~'])
def test_clip_grad_none(tmp_path, spelling):
    c = load_config(write(tmp_path / 'a.yaml', f"TRAIN:\n  CLIP_GRAD: {spelling}\n"))
    assert c.TRAIN.CLIP_GRAD is None


def test_clip_grad_none_from_opts_and_back(tmp_path):
    cfg = write(tmp_path / 'a.yaml', "TRAIN:\n  CLIP_GRAD: None\n")
    assert load_config(write(tmp_path / 'b.yaml', "{}\n"), ['TRAIN.CLIP_GRAD', 'None']).TRAIN.CLIP_GRAD is None
    assert load_config(cfg, ['TRAIN.CLIP_GRAD', '3.0']).TRAIN.CLIP_GRAD == 3.0


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match='not found'):
        load_config(str(tmp_path / 'nope.yaml'))
    with pytest.raises(ConfigError, match='bad.yaml'):
        load_config(write(tmp_path / 'bad.yaml', "DATA: [unclosed\n"))


def test_validation_errors_name_the_key(tmp_path):
    cfg = write(tmp_path / 'a.yaml', "{}\n")
    for opts, key in [(['DATA.BATCH_SIZE', '0'], 'DATA.BATCH_SIZE'), (['AMP_DTYPE', 'float8'], 'AMP_DTYPE'),
                      (['MODEL.LA.KERNEL_SIZE', '4'], 'MODEL.LA.KERNEL_SIZE'),
                      (['MODEL.LA.CSWIN_LA_SPLIT_SIZE', '56-28-14'], 'CSWIN_LA_SPLIT_SIZE')]:
        with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
            load_config(cfg, opts)


@pytest.mark.parametrize('path', SHIPPED, ids=[os.path.relpath(p, ROOT) for p in SHIPPED])
def test_every_shipped_config_loads(path):
    c = load_config(path)
    assert c.MODEL.TYPE in model_types(), f'{path}: MODEL.TYPE {c.MODEL.TYPE!r} is not registered'
