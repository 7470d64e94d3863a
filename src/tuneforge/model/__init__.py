"""Models: loading, attention implementations, LoRA/QLoRA, GGUF import and export."""
