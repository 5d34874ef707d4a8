"""nanochat-hf: Karpathy's nanochat as a native Hugging Face model, plus its tokenizer, optimizer and converters.

Importing the package registers the `nanochat_hf` model type with the Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` works on anything this project saves. Processes without the package
load the same directories with `trust_remote_code=True` (the modeling files are saved next to the weights).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_nanochat import ARCHITECTURE_ERAS, NanoChatConfig
from .modeling_nanochat import NanoChatCache, NanoChatForCausalLM, NanoChatModel, NanoChatPreTrainedModel

AutoConfig.register(NanoChatConfig.model_type, NanoChatConfig, exist_ok=True)
AutoModel.register(NanoChatConfig, NanoChatModel, exist_ok=True)
AutoModelForCausalLM.register(NanoChatConfig, NanoChatForCausalLM, exist_ok=True)

__all__ = ["ARCHITECTURE_ERAS", "NanoChatConfig", "NanoChatModel", "NanoChatForCausalLM", "NanoChatPreTrainedModel",
           "NanoChatCache"]
