"""Config overrides for a tiny M3I model, shared by the model tests."""

TINY_M3I = [
    "model.name=vit_tiny_patch16_224",
    "model.depth=2",
    "decoder.dim=32",
    "decoder.depth=1",
    "decoder.heads=2",
    "targets.category.hidden_dim=16",
    "targets.category.embed_dim=8",
    "targets.text.hidden_dim=16",
    "targets.text.embed_dim=8",
    "targets.text.width=16",
    "targets.text.depth=1",
    "targets.text.heads=2",
    "targets.text.context_length=8",
]
