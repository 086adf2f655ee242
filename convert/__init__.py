"""PyTorch checkpoint converters (LlamaGen GPT and VQ). torch is not required."""
