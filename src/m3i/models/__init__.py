"""Models: the backbone contract and its families (imported here so that they register), the
decoder, heads, text towers and the EMA teacher."""

from m3i.models import convnet, vit  # noqa: F401  (each registers its backbone family)
