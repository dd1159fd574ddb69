"""The training command line both launchers share: ``train_jax.py`` and ``train_torch.py`` are
``sys.exit(main(argv, backend=...))``.

Flags are parsed first (``swamla.train_config.parse_args``) and only then is the backend's trainer
imported, so ``--help`` and a bad flag answer at once. Exit status: 0 on success, 2 for bad input
(config, data, checkpoint; ``INPUT_ERRORS``), 1 for a run that failed (``TrainingError``), each
with ``error: ...`` on stderr.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Sequence

from swamla.config import ConfigError
from swamla.data import DataError
from swamla.portable import CheckpointError
from swamla.train_config import TrainingError, parse_args

# The trainer module of each backend; each has ``train(cfg: TrainConfig) -> dict``.
BACKENDS = {"jax": "swamla_jax.train", "torch": "swamla_torch.train"}
# The errors that mean bad input, not a failed run: reported without a traceback.
INPUT_ERRORS = (ConfigError, DataError, CheckpointError)
# Libraries that log every checkpoint save at INFO; their warnings still show.
QUIET_LOGGERS = ("absl", "jax", "orbax")


def main(argv: Sequence[str] | None = None, *, backend: str) -> int:
    """Parse ``argv`` (sys.argv[1:] when None), train with ``backend`` ('jax' or 'torch'), and
    return the exit status."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        cfg = parse_args(argv)
        importlib.import_module(BACKENDS[backend]).train(cfg)
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
