"""Export a model to ONNX (torch.onnx's dynamo exporter) or to a torch.export program (.pt2).

    python tools/export.py flatten_swin_t --format onnx --check                 # random weights
    python tools/export.py --cfg cfgs/flatten_swin_t.yaml --checkpoint flatten_swin_t.pth --format onnx \\
        --output flatten_swin_t.onnx --check
    python tools/export.py dat_tiny --format pt2 --check

The model is a registered timm name (``timm.list_models()`` after ``import models``) or a config (``--cfg``);
``--checkpoint`` loads weights as ``main.py --eval --resume`` does (strict, safe loading, any official
wrapping). The input is a (batch, 3, size, size) image batch, size = the model's own by default; an ONNX
file takes any batch size (its first input dimension is named ``batch``; ``--static-batch`` fixes it to
``--batch``), a .pt2 program the ``--batch`` of the example input.
``--check`` runs the exported file (ONNX Runtime on CPU, or the loaded .pt2 program) on random batches (of
1 and 3 images too for a dynamic batch) and prints its largest deviation from the eager model, relative to
the largest eager logit, and from a float64 run of the eager model next to eager float32's own; it exits 1
above ``--tolerance`` unless the file is as close to float64 as eager float32 is (a badly conditioned model,
e.g. random weights with huge logits, is not reproducible to 1e-4 by float32 at all). Bad input is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import warnings
from typing import Optional, Sequence, Tuple

if __name__ == '__main__' and not __package__:   # run as a file: tools/_root.py puts the repository root on the path
    import _root  # noqa: F401

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import errors  # noqa: E402
from errors import UserError  # noqa: E402

logger = logging.getLogger('export')
FORMATS = ('onnx', 'pt2')


def build(name: Optional[str], cfg: Optional[str], checkpoint: Optional[str],
          img_size: Optional[int]) -> Tuple[nn.Module, int]:
    """(eval model, input size) from a registered name or a config file, weights from ``checkpoint``."""
    import timm
    import models  # noqa: F401  (registration)
    if (name is None) == (cfg is None):
        raise UserError('give a model name or --cfg (one of the two), e.g. tools/export.py flatten_swin_t')
    if cfg is not None:
        if not os.path.isfile(cfg):
            raise UserError(f'--cfg {cfg}: no such file')
        from config import load_config
        config = load_config(cfg, [] if img_size is None else ['DATA.IMG_SIZE', str(img_size)])
        model, size = models.build_model(config), config.DATA.IMG_SIZE
    else:
        if not timm.is_model(name):
            raise UserError(f"unknown model {name!r}; {_suggest(name, timm.list_models())}")
        model = _create_at_size(name, img_size)
        size = img_size or model.pretrained_cfg['input_size'][-1]
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise UserError(f'--checkpoint {checkpoint}: no such file')
        import checkpoint as ckpt_io        # strict, safe loading of any official wrapping (as --eval --resume)
        ckpt_io.load_model_state(model, ckpt_io.extract_model_state(ckpt_io.load_checkpoint(checkpoint)), checkpoint)
        logger.info('loaded the weights of %s', checkpoint)
    return model.eval(), size


def _suggest(name: str, names: Sequence[str]) -> str:
    """'did you mean ...?' with the closest registered names (spelling, then substring), or where to look."""
    import difflib
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6) or \
        difflib.get_close_matches(name.lower(), [n.lower() for n in names], n=5, cutoff=0.6) or \
        [n for n in names if name.lower() in n.lower()][:8]
    return f"did you mean one of {', '.join(close)}?" if close else "see timm.list_models() after `import models`"


def _create_at_size(name: str, img_size: Optional[int]) -> nn.Module:
    """``timm.create_model(name)`` for ``img_size`` inputs: built for that size where the model takes
    ``img_size`` (UserError naming --img-size if it refuses it); a model without the argument (a CNN) as is."""
    import timm
    if img_size is None:
        return timm.create_model(name)
    try:
        return timm.create_model(name, img_size=img_size)
    except TypeError as e:
        if 'img_size' not in str(e):
            raise
        return timm.create_model(name)
    except (ValueError, AssertionError) as e:
        raise UserError(f"--img-size {img_size}: {name} cannot be built for it ({' '.join(str(e).split())}); "
                        f"choose another --img-size") from None


def check_runs(model: nn.Module, x: torch.Tensor, what: str) -> None:
    """UserError naming ``what`` (the option that set the input) when ``model`` does not run on ``x``."""
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:     # any model error on this input shape
        raise UserError(f"{what}: the model does not run on input {tuple(x.shape)} "
                        f"({' '.join(str(e).split()) or type(e).__name__}); choose another {what}") from None


def export(model: nn.Module, x: torch.Tensor, fmt: str, path: str, dynamic_batch: bool = True) -> bool:
    """Write ``model`` traced on ``x`` to ``path``: ONNX (dynamo exporter, optimised) or a .pt2 program (the
    batch of ``x``). With ``dynamic_batch`` the ONNX input and output take any batch size (traced on two
    images: torch.export fixes a dimension seen as 1); a model that cannot be exported so is exported with
    the batch of ``x`` and a warning. Returns whether the batch is dynamic."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings('ignore')
        if fmt != 'onnx':
            torch.export.save(torch.export.export(model, (x,)), path)
            return False
        if dynamic_batch:
            example = torch.cat([x, x]) if x.shape[0] == 1 else x
            try:
                torch.onnx.export(model, (example,), path, dynamo=True, input_names=['image'],
                                  output_names=['logits'], dynamic_shapes=({0: torch.export.Dim('batch')},),
                                  verbose=False)
                if _batch_is_dynamic(path):
                    return True
                raise RuntimeError('the exporter fixed the batch dimension')
            except Exception as e:       # the exporter's many error types: fall back to the example's batch
                logger.warning('a dynamic batch dimension does not export for this model (%s); exporting a fixed '
                               'batch of %d instead (--batch sets it)', errors.one_line(e)[:200], x.shape[0])
        torch.onnx.export(model, (x,), path, dynamo=True, input_names=['image'], output_names=['logits'],
                          verbose=False)
        return False


def _batch_is_dynamic(path: str) -> bool:
    """Whether the first input of the ONNX file ``path`` has a symbolic (any-size) first dimension."""
    import onnx
    dim = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return bool(dim.dim_param) or not dim.HasField('dim_value')


def run_exported(path: str, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """The exported file's output on ``x``: ONNX Runtime (CPU) or the reloaded torch.export program."""
    if fmt == 'pt2':
        with torch.no_grad():
            return torch.export.load(path).module()(x)
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError('--check of an ONNX file needs ONNX Runtime: pip install onnxruntime') from None
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def check_exported(model: nn.Module, x: torch.Tensor, out: torch.Tensor, tolerance: float) -> Tuple[bool, str]:
    """Does ``out`` (the exported model's output for ``x``) reproduce eager? Within ``tolerance`` (relative)
    of eager float32; or else, as close to the float64 eager result as eager float32 itself is (within twice
    eager's own error): a badly conditioned model (e.g. random weights with large activations) is not
    reproducible to 1e-4 by float32 at all, and the export is then as faithful as eager. Returns (passed,
    a one-line report with the three numbers)."""
    with torch.no_grad():
        ref = model(x)
        exact = copy.deepcopy(model).double()(x.double())
    err, floor, err_exact = relative_error(out, ref), relative_error(ref, exact), relative_error(out, exact)
    report = (f'vs eager: max relative error {err:.2e} (tolerance {tolerance:g}); vs float64 eager {err_exact:.2e}, '
              f'eager float32 itself {floor:.2e}')
    if err <= tolerance:
        return True, report
    if err_exact <= 2 * floor:
        return True, report + ': above the tolerance, but as close to float64 as eager float32 is (float32 rounding)'
    return False, report + ': FAILED'


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('model', nargs='?', help='registered timm name, e.g. flatten_swin_t (or use --cfg)')
    parser.add_argument('--cfg', help='a config file (cfgs/*.yaml) instead of a model name')
    parser.add_argument('--checkpoint', help='weights to load (as main.py --eval --resume loads them)')
    parser.add_argument('--format', default='onnx', choices=FORMATS, help='onnx (default) or pt2 (torch.export)')
    parser.add_argument('--output', help='file to write (default: <model>.onnx / <model>.pt2 here)')
    parser.add_argument('--img-size', type=int, help="input size (default: the model's own)")
    parser.add_argument('--batch', type=int, default=1,
                        help='batch size of the example input (default 1); an ONNX file takes any batch size')
    parser.add_argument('--static-batch', action='store_true',
                        help='ONNX: fix the batch dimension to --batch (default: dynamic)')
    parser.add_argument('--check', action='store_true', help='compare the exported file with eager on CPU')
    parser.add_argument('--tolerance', type=float, default=1e-4, help='--check fails above this (default 1e-4)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if args.batch < 1 or (args.img_size is not None and args.img_size < 1):
        raise UserError('--batch and --img-size must be positive')
    model, size = build(args.model, args.cfg, args.checkpoint, args.img_size)
    stem = args.model or os.path.splitext(os.path.basename(args.cfg))[0]
    path = args.output or f'{stem}.{args.format}'
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f'--output {path}: folder {folder} does not exist')
    x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    check_runs(model, x, '--img-size' if args.img_size else '--batch')
    dynamic = export(model, x, args.format, path, args.format == 'onnx' and not args.static_batch)
    shape = ('batch',) + tuple(x.shape[1:]) if dynamic else tuple(x.shape)
    print(f'wrote {path} ({args.format}, input {shape})')
    if args.check:
        runner = 'ONNX Runtime (CPU)' if args.format == 'onnx' else 'torch.export program'
        ok = True
        for batch in sorted({args.batch, 1, 3}) if dynamic else (args.batch,):
            xb = torch.randn(batch, *x.shape[1:], generator=torch.Generator().manual_seed(batch))
            passed, message = check_exported(model, xb, run_exported(path, args.format, xb), args.tolerance)
            print(f'{runner} batch {batch}: {message}')
            ok = ok and passed
        return 0 if ok else 1
    return 0


if __name__ == '__main__':
    sys.exit(errors.cli(main))
