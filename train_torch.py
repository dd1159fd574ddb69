"""Train SWA-MLA with PyTorch: ``python train_torch.py --size tiny ...`` or under ``torchrun``.

Flags are those of ``swamla.train_config`` (``--help`` lists them); the trainer is
``swamla_torch.train``, run by the command line both backends share (``swamla.train_cli``).
"""

import sys

from swamla.train_cli import main as _main


def main(argv=None) -> int:
    return _main(argv, backend="torch")


if __name__ == "__main__":
    sys.exit(main())
