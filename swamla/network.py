"""The Hugging Face hub calls of this package, each under a deadline.

The hub clients retry a request that times out (about 10 s, six times, per file) and a hub that
accepts connections but never answers then stalls a run for minutes without a word. So every call
that may wait on the hub (a tokenizer download, an export's push) goes through ``within_deadline``:
it logs what it waits for and how long it will, and a stall ends in one ``HubTimeout`` line naming
the offline switches. ``SWAMLA_HUB_TIMEOUT`` (seconds) sets the deadline.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, TypeVar

from swamla.config import ConfigError

logger = logging.getLogger(__name__)

HUB_TIMEOUT_VAR = "SWAMLA_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 60.0  # tokenizer files and a repo creation take seconds on a working hub
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
DEFAULT_ENDPOINT = "https://huggingface.co"

T = TypeVar("T")


class HubTimeout(TimeoutError):
    """A hub call that did not finish before its deadline."""


def hub_offline() -> bool:
    """Whether one of the offline switches (HF_HUB_OFFLINE...) is set now."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in OFFLINE_VARS)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def hub_timeout() -> float:
    """The deadline of one hub call in seconds: ``SWAMLA_HUB_TIMEOUT``, else 60."""
    text = os.environ.get(HUB_TIMEOUT_VAR, "").strip()
    if not text:
        return DEFAULT_HUB_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{HUB_TIMEOUT_VAR} must be a number of seconds > 0, got {text!r}")
    return seconds


def within_deadline(call: Callable[[], T], *, what: str, seconds: float) -> T:
    """``call()``'s result, or HubTimeout once ``seconds`` pass without one.

    The call runs in a daemon thread: a hub that never answers leaves that thread waiting, and it
    ends with the process, which the caller's error is about to end.
    """
    logger.info("waiting up to %g s for %s (%s sets the wait)", seconds, what, HUB_TIMEOUT_VAR)
    outcome: dict[str, object] = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as e:  # handed to the caller's thread, raised there
            outcome["error"] = e

    worker = threading.Thread(target=run, name=f"hub: {what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise HubTimeout(f"{what}: the Hugging Face hub at {hub_endpoint()} did not answer "
                         f"within {seconds:g} s ({HUB_TIMEOUT_VAR} sets the wait)")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
