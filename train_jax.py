"""Train SWA-MLA with JAX/Flax: ``python train_jax.py --size small --batch_size 8 ...``.

Flags are those of ``swamla.train_config`` (``--help`` lists them); the trainer is
``swamla_jax.train``, run by the command line both backends share (``swamla.train_cli``).
"""

import sys

from swamla.train_cli import main as _main


def main(argv=None) -> int:
    return _main(argv, backend="jax")


if __name__ == "__main__":
    sys.exit(main())
