"""Train SWA-MLA with JAX/Flax: ``python train_jax.py --size small --batch_size 8 ...``.

Flags are those of ``swamla.train_config`` (see README); the trainer is ``swamla_jax.train``.
"""

import logging
import sys

from swamla.config import ConfigError
from swamla.data import DataError
from swamla.portable import CheckpointError
from swamla.train_config import TrainingError, parse_args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax"):  # per-save chatter; their warnings still show
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = parse_args(argv)
        from swamla_jax.train import train  # after parsing, so --help and bad flags are instant

        train(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
