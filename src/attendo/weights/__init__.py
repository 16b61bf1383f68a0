"""Reading checkpoints: safetensors directories, GGUF files, and the names that map them onto ours."""
