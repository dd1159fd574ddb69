"""SWA-MLA as a ``transformers`` model: the config, the causal LM, and the export.

    swamla-convert SRC DST --to hf       # then AutoModelForCausalLM.from_pretrained(DST,
                                         #   trust_remote_code=True), AutoTokenizer too

See docs/hf.md. Importing this package imports ``transformers``.
"""

from swamla_torch.hf.configuration_swamla import SWAMLAConfig
from swamla_torch.hf.export import export_hf, export_run, hf_model_from_tensors
from swamla_torch.hf.modeling_swamla import SWAMLAForCausalLM

__all__ = ["SWAMLAConfig", "SWAMLAForCausalLM", "export_hf", "export_run", "hf_model_from_tensors"]
