"""Layer 5, publishing: card, figures, the output folder and push, the LoRA adapter, the streaming bake."""
