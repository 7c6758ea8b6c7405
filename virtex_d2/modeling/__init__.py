"""Meta-architectures, backbones and textual heads (registered on import)."""
