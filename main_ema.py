"""Train / evaluate with an exponential moving average of the weights (timm ModelEmaV3): ``main.py``
plus ``--model-ema`` (on by default, ``--no-model-ema`` turns it off), ``--model-ema-decay`` and
``--model-ema-force-cpu``. The run is the same ``runner.run``; the EMA is evaluated every epoch, saved
in every checkpoint and ``max_ema_acc.pth``, and resumed with the rest."""
import sys

from main import main

if __name__ == '__main__':
    sys.exit(main(ema=True))
