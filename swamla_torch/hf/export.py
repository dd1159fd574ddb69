"""Write a Hugging Face export of SWA-MLA weights: ``swamla-convert SRC DST --to hf``, and at the
end of a training run with ``--export_hf`` or ``--push_to_hub`` (``export_run``).

The directory loads with ``AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True)``
and ``AutoTokenizer.from_pretrained(DST)``; ``swamla.hf_files`` describes it and reads it back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig, GPT2Tokenizer

from swamla.config import ModelConfig
from swamla.hf_files import CODE_FILES, is_hf_export
from swamla.portable import atomic_directory, check_tensors
from swamla.tokenizer import GPT2_EOS, bundled_gpt2_files
from swamla_torch.hf.configuration_swamla import GPT2_EOS_ID, SWAMLAConfig
from swamla_torch.hf.modeling_swamla import SWAMLAForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
AUTO_MAP = {"AutoConfig": "configuration_swamla.SWAMLAConfig",
            "AutoModelForCausalLM": "modeling_swamla.SWAMLAForCausalLM"}


def hf_model_from_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray],
                          source: str) -> SWAMLAForCausalLM:
    """A float32 ``SWAMLAForCausalLM`` holding portable ``tensors`` (checked against ``cfg``)."""
    check_tensors(tensors, cfg, source)
    config = SWAMLAConfig.from_model_config(cfg, architectures=["SWAMLAForCausalLM"],
                                            auto_map=dict(AUTO_MAP))
    with torch.device("meta"):
        model = SWAMLAForCausalLM(config)
    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy()) for k, v in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def gpt2_tokenizer() -> GPT2Tokenizer:
    """GPT-2's tokenizer from the BPE files shipped with swamla (no network)."""
    encoder, merges = bundled_gpt2_files()
    vocab = json.loads(encoder.read_text(encoding="utf-8"))
    lines = merges.read_text(encoding="utf-8").splitlines()
    pairs = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    return GPT2Tokenizer(vocab=vocab, merges=pairs, unk_token=GPT2_EOS, bos_token=GPT2_EOS,
                         eos_token=GPT2_EOS)


def export_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray], directory: str | Path, *,
              dtype: str = "float32", max_shard_size: int | str = "2GB",
              source: str = "the model being exported") -> Path:
    """Write a Hugging Face export of portable ``tensors`` at ``directory``, atomically.

    An existing ``directory`` is replaced only if empty or another export (the caller checks
    ``--overwrite`` first, as for every conversion). Weights larger than ``max_shard_size`` are
    sharded with an index.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    model = hf_model_from_tensors(cfg, tensors, source).to(DTYPES[dtype])
    model.config.dtype = dtype
    model.generation_config = GenerationConfig(bos_token_id=GPT2_EOS_ID, eos_token_id=GPT2_EOS_ID,
                                               pad_token_id=GPT2_EOS_ID)
    code = Path(__file__).resolve().parent
    with atomic_directory(directory, what="Hugging Face export", is_same_kind=is_hf_export) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        gpt2_tokenizer().save_pretrained(tmp)
        for name in CODE_FILES:
            shutil.copyfile(code / name, tmp / name)
    return Path(directory)


def export_run(cfg, tensors: dict[str, np.ndarray], output_dir: str | Path) -> Path:
    """The end of a training run with ``export_hf`` or ``push_to_hub`` (a TrainConfig ``cfg``),
    for both trainers: write the transformers export of the final weights ``tensors`` (portable)
    at ``output_dir/export_hf``, replacing the export of an earlier end of this run, then push
    it to ``cfg.push_to_hub`` if set (``swamla.hub.push_export``). Returns the export's path."""
    from swamla.hub import EXPORT_HF_DIR, push_export

    path = export_hf(cfg.model, tensors, Path(output_dir) / EXPORT_HF_DIR,
                     source="the final weights of the run")
    if cfg.push_to_hub:
        push_export(path, cfg.push_to_hub)
    return path
