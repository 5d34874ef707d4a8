"""nanochat-hf: Karpathy's nanochat as a native Hugging Face model, plus its tokenizer, optimizer and converters.

Importing the package registers the `nanochat_hf` model type with the Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` works on anything this project saves. Processes without the package
load the same directories with `trust_remote_code=True` (the modeling files are saved next to the weights).
"""

import logging as _logging


class _DropKnownNoise(_logging.Filter):
    """Drops a logger's records that contain one of `fragments`; every other record passes."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record):
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def _quiet_known_start_up_noise() -> None:
    """transformers imports torchao (when installed: the `compress` extra) and accelerate may import DeepSpeed at start
    up, and on a CPU-only torch every command then began with four to five warnings that ask nothing of the user:
    torchao failing to load its CUDA kernel libraries, torch deprecating how torchao registers two enums, DeepSpeed
    "setting accelerator to CPU". Exactly those records are dropped (tests/utils/test_start_up.py checks that they
    still appear without this package, so the filter goes when they do); on a CUDA or ROCm build a kernel that fails to
    load is worth seeing and stays."""
    import torch

    _logging.getLogger("torch.utils._pytree").addFilter(
        _DropKnownNoise("is an Enum subclass and is now natively supported by torch.compile"))
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        _logging.getLogger("torchao").addFilter(_DropKnownNoise("Failed to load "))
        _logging.getLogger("DeepSpeed").addFilter(_DropKnownNoise("Setting accelerator to CPU"))


_quiet_known_start_up_noise()

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

from .configuration_nanochat import ARCHITECTURE_ERAS, NanoChatConfig  # noqa: E402
from .modeling_nanochat import NanoChatCache, NanoChatForCausalLM, NanoChatModel, NanoChatPreTrainedModel  # noqa: E402

AutoConfig.register(NanoChatConfig.model_type, NanoChatConfig, exist_ok=True)
AutoModel.register(NanoChatConfig, NanoChatModel, exist_ok=True)
AutoModelForCausalLM.register(NanoChatConfig, NanoChatForCausalLM, exist_ok=True)

__all__ = ["ARCHITECTURE_ERAS", "NanoChatConfig", "NanoChatModel", "NanoChatForCausalLM", "NanoChatPreTrainedModel",
           "NanoChatCache"]
