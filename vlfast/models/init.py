"""Initialisation shared by the models: BERT's and timm ViT's normal(0, 0.02) weights, zero biases."""
from torch import nn


def init_weights(module: nn.Module) -> None:
    """For ``model.apply``: small weights keep the tied MLM decoder's first logits near zero."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
