"""Loading models and tokenizers (padding ids, device choice) and converting GGUF files."""

# what adaptune.models held before it became a package
from adaptune.models.loading import (
    DEFAULT_MODEL,
    existing_model_path,
    is_causal_lm,
    load_causal_lm,
    load_classifier,
    load_tokenizer,
    pick_device,
    quiet_transformers,
    resolve_model_path,
)

__all__ = [
    "DEFAULT_MODEL",
    "existing_model_path",
    "is_causal_lm",
    "load_causal_lm",
    "load_classifier",
    "load_tokenizer",
    "pick_device",
    "quiet_transformers",
    "resolve_model_path",
]
