"""Writers of checkpoint files: safetensors -> GGUF conversion and synthetic GGUF files of a
family's real geometry (benchmarks and tests). May import `hybrid.models` (the families' name
tables) and `hybrid.files`; nothing in the runtime imports this layer."""
