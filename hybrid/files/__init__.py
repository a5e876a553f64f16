"""Checkpoint files and tokenizers: reading GGUF and safetensors (every count, offset and size
checked against the file), the tokenizer and chat templates, and what a model's files say about
it. The lowest layer: imports nothing else from hybrid."""
