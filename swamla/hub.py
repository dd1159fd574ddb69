"""The transformers export a training run writes at its end (``--export_hf``), and its push to the
Hugging Face Hub (``--push_to_hub REPO``); docs/hf.md.

Framework-free: the trainers call ``check_run_export`` before training, so a run that could not
write or push its export fails before it spends any compute, and ``swamla_torch.hf.export.
export_run`` at the end. ``huggingface_hub`` is imported only when a push is asked for, and each
call of the push runs under a deadline (``swamla.network``), so a stalled hub is one error.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from swamla.config import ConfigError
from swamla.network import HubTimeout, hub_timeout, within_deadline
from swamla.train_config import TrainingError

EXPORT_HF_DIR = "export_hf"  # under output_dir
HF_PACKAGES = ("torch", "transformers")
# The average rate below which an upload counts as stalled: its deadline is the hub timeout plus
# one second per MiB.
MIN_UPLOAD_BYTES_PER_S = 1 << 20


def wants_hf_export(cfg) -> bool:
    """Whether the run writes output_dir/export_hf at its end (push_to_hub implies it)."""
    return bool(cfg.export_hf or cfg.push_to_hub)


def check_run_export(cfg) -> None:
    """Fail now, not after training, when the end-of-run transformers export or its push cannot
    happen: a ConfigError for a missing package, a CheckpointError for an output_dir/export_hf
    that is anything but an earlier export of this run, a TrainingError for a push while offline
    or without a login."""
    if not wants_hf_export(cfg):
        return
    flag = f"push_to_hub={cfg.push_to_hub!r}" if cfg.push_to_hub else "export_hf=true"
    missing = [name for name in HF_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{flag} needs {' and '.join(missing)}: pip install 'swamla[hf]' (or "
                          "drop the flag and convert later with swamla-convert OUTPUT_DIR DST "
                          "--to hf)")
    from swamla.hf_files import is_hf_export
    from swamla.portable import check_destination

    directory = Path(cfg.output_dir) / EXPORT_HF_DIR
    check_destination(directory, "Hugging Face export", is_hf_export, overwrite=True)
    if cfg.push_to_hub:
        check_push(cfg.push_to_hub, directory, written=False)


def _hub():
    try:
        import huggingface_hub
    except ImportError as e:
        raise ConfigError("push_to_hub needs the huggingface_hub package: pip install "
                          "'swamla[hf]'") from e
    return huggingface_hub


def _later(directory: Path, repo_id: str, written: bool) -> str:
    """What the user can still do, before training (nothing written yet) or after it."""
    upload = f"`hf upload {repo_id} {directory}`"
    if not written:
        return f"or train with --export_hf instead and push {directory} later with {upload}"
    return f"the local export at {directory} is complete and can be pushed later with {upload}"


def _offline(hub) -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; the variable may be set since.
    value = os.environ.get("HF_HUB_OFFLINE", "").upper()
    return hub.constants.HF_HUB_OFFLINE or value in ("1", "ON", "YES", "TRUE")


def check_push(repo_id: str, directory: Path, *, written: bool) -> None:
    """Raise a TrainingError naming what to do when pushing to ``repo_id`` cannot work: the Hub
    is offline (HF_HUB_OFFLINE) or no token is set up. ``directory`` is the export, ``written``
    once the run wrote it."""
    hub, later = _hub(), _later(directory, repo_id, written)
    if _offline(hub):
        raise TrainingError(f"push_to_hub={repo_id!r} but the Hub is offline (HF_HUB_OFFLINE is "
                            f"set): unset HF_HUB_OFFLINE to push; {later}")
    if hub.get_token() is None:
        raise TrainingError(f"push_to_hub={repo_id!r} needs a Hugging Face login: run "
                            f"`hf auth login` or set HF_TOKEN; {later}")


def push_export(directory: str | Path, repo_id: str, *, timeout: float | None = None) -> str:
    """Upload the export at ``directory`` to the Hub model repo ``repo_id`` (created if missing);
    returns the commit URL. Every failure is one TrainingError line naming what to do; a call
    that outlasts ``timeout`` seconds (``swamla.network.hub_timeout()`` when None; the upload gets
    one more second per MiB) is one of them."""
    directory = Path(directory)
    check_push(repo_id, directory, written=True)
    hub = _hub()
    api = hub.HfApi()
    seconds = hub_timeout() if timeout is None else timeout
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    # OSError covers the Hub's HTTP errors (refused id, no write access), being offline and a
    # deadline passed (HubTimeout); ValueError an id the client rejects; errors.HTTPError is the
    # HTTP client's own base class (connection refused), which huggingface_hub raises unwrapped.
    try:
        within_deadline(lambda: api.create_repo(repo_id, repo_type="model", exist_ok=True),
                        what=f"creating the Hub repo {repo_id!r}", seconds=seconds)
        commit = within_deadline(
            lambda: api.upload_folder(repo_id=repo_id, folder_path=directory, repo_type="model",
                                      commit_message="Upload SWA-MLA transformers export"),
            what=f"uploading {directory} ({size / 2**20:.1f} MiB) to the Hub repo {repo_id!r}",
            seconds=seconds + size / MIN_UPLOAD_BYTES_PER_S)
    except HubTimeout as e:
        raise TrainingError(f"could not push to the Hub repo {repo_id!r}: {e}; "
                            f"{_later(directory, repo_id, True)}") from e
    except (OSError, ValueError, hub.errors.HTTPError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise TrainingError(f"could not push to the Hub repo {repo_id!r} ({type(e).__name__}: "
                            f"{reason}): check the network, the repo id and that your token may "
                            f"write to it; {_later(directory, repo_id, True)}") from e
    return str(getattr(commit, "commit_url", commit))
