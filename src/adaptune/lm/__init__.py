"""Causal language models: chat data, the response-only loss and perplexity, generation."""
