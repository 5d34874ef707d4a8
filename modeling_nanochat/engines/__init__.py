"""Our architecture inside serving engines that bring their own model code and paged KV cache.

`vllm_model.py` is nanochat in vLLM's model API, exact at every decode step (the smear included); `register_vllm`
is the plugin vLLM calls at start-up (entry point `vllm.general_plugins` in pyproject.toml), so that `vllm serve DIR`
and `vllm.LLM(DIR)` pick it up for every checkpoint this project saves, without flags.

Nothing here is imported unless an engine asks for it: importing this package does not import vLLM.
"""

ARCHITECTURE = "NanoChatHFForCausalLM"  # `architectures[0]` in every config.json this project writes


def register_vllm():
    """vLLM's general-plugin hook: our config class for `model_type` "nanochat_hf" (so no `--trust-remote-code` is
    needed) and our vLLM model for the architecture name. vLLM may call it several times, in every process."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ..configuration_nanochat import NanoChatConfig

    AutoConfig.register(NanoChatConfig.model_type, NanoChatConfig, exist_ok=True)
    ModelRegistry.register_model(ARCHITECTURE, "modeling_nanochat.engines.vllm_model:NanoChatForVLLM")


__all__ = ["ARCHITECTURE", "register_vllm"]
