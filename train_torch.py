"""Train SWA-MLA with PyTorch: ``python train_torch.py --size tiny ...`` or under ``torchrun``.

The flags are those of ``train_jax.py`` (``swamla.train_config``; ``--help`` lists them).
"""

import sys

from swamla.train_config import parse_args


def main(argv=None) -> int:
    from swamla_torch.train import INPUT_ERRORS, TrainingError, train

    try:
        train(parse_args(argv))
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
