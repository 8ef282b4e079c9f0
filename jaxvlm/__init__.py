"""jaxvlm: vision-language models from a frozen image encoder, a frozen LLM and a trainable bridge."""

__version__ = "0.1.0"
