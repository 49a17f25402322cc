"""BERT text and fusion encoder with Hugging Face's parameter names, split at fusion_layer.

As ALBEF/X-VLM's xbert: layers [0, fusion_layer) see text only; layers [fusion_layer, depth)
add cross-attention from the text to image tokens. Parameter names are Hugging Face's, so
vlfast.models.pretrained loads a hub folder into it (legacy LayerNorm gamma/beta names included);
only the new cross-attention weights stay as initialised. Every attention goes through
vlfast.ops.attention (no dropout on attention probabilities: a fused kernel never forms them), every dense-dropout-add-LayerNorm output
through vlfast.ops.dropout_add_layer_norm.
"""
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlfast.models.init import init_weights
from vlfast.ops import attention, dropout_add_layer_norm


@dataclass
class TextConfig:
    vocab_size: int = 30522
    width: int = 768
    depth: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    fusion_layer: int = 6  # layers from here on cross-attend to the image tokens
    encoder_width: int = 768  # width of the image tokens

    HF_NAMES = {"hidden_size": "width", "num_hidden_layers": "depth", "num_attention_heads": "heads",
                "intermediate_size": "intermediate", "max_position_embeddings": "max_positions",
                "hidden_dropout_prob": "dropout"}

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> "TextConfig":
        """From a transformers.BertConfig, its dict, or a local HF model directory (config.json)."""
        if isinstance(hf_config, (str, Path)):
            hf_config = json.loads((Path(hf_config) / "config.json").read_text())
        elif not isinstance(hf_config, dict):
            hf_config = hf_config.to_dict()
        if hf_config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only hidden_act='gelu' is supported, got {hf_config['hidden_act']!r}")
        names = {f.name for f in fields(cls)}
        values = {cls.HF_NAMES.get(k, k): v for k, v in hf_config.items() if cls.HF_NAMES.get(k, k) in names}
        return cls(**{**values, **overrides})


class BertEmbeddings(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.width)
        self.position_embeddings = nn.Embedding(config.max_positions, config.width)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.width)
        self.LayerNorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


def _autocast_input(x: Tensor) -> Tensor:
    """``x`` as autocast would cast it for a matrix product (as it is when autocast is off)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point() and x.dtype != torch.float64:  # autocast skips fp64
        return x.to(torch.get_autocast_dtype(device))
    return x


class BertSelfAttention(nn.Module):
    def __init__(self, config: TextConfig, key_width: int):
        super().__init__()
        self.heads = config.heads
        self.query = nn.Linear(config.width, config.width)
        self.key = nn.Linear(key_width, config.width)
        self.value = nn.Linear(key_width, config.width)

    def forward(self, x: Tensor, context: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        def heads(t):  # (B, L, W) -> (B, H, L, W / H)
            return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        # One cast per input under autocast, not one per projection: autocast caches weights' casts
        # only, so query, key and value would each cast the same fp32 states. The forward's numbers
        # are the same; the backward sums the three projections' input gradients in bf16 before the
        # one cast back (as autocast does for a weight used several times), not in fp32 after three.
        x, context = (_autocast_input(x),) * 2 if context is x else (_autocast_input(x), _autocast_input(context))
        out = attention(heads(self.query(x)), heads(self.key(context)), heads(self.value(context)),
                        key_padding_mask=key_padding_mask)
        return out.transpose(1, 2).reshape(x.shape)


class BertResidual(nn.Module):
    """dense, dropout, residual add, LayerNorm: HF's BertSelfOutput and BertOutput."""

    def __init__(self, config: TextConfig, in_width: int):
        super().__init__()
        self.dense = nn.Linear(in_width, config.width)
        self.LayerNorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return dropout_add_layer_norm(self.dense(x), residual, self.LayerNorm.weight, self.LayerNorm.bias,
                                      self.dropout.p, eps=self.LayerNorm.eps, training=self.training)


class BertAttention(nn.Module):
    def __init__(self, config: TextConfig, key_width: int):
        super().__init__()
        self.self = BertSelfAttention(config, key_width)
        self.output = BertResidual(config, config.width)

    def forward(self, x, context, key_padding_mask):
        return self.output(self.self(x, context, key_padding_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.dense = nn.Linear(config.width, config.intermediate)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: TextConfig, cross_attention: bool):
        super().__init__()
        self.attention = BertAttention(config, config.width)
        self.crossattention = BertAttention(config, config.encoder_width) if cross_attention else None
        self.intermediate = BertIntermediate(config)
        self.output = BertResidual(config, config.intermediate)

    def forward(self, x, mask, context=None, context_mask=None):
        x = self.attention(x, x, mask)
        if self.crossattention is not None:
            x = self.crossattention(x, context, context_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config, cross_attention=i >= config.fusion_layer) for i in range(config.depth))


class BertModel(nn.Module):
    """mode="text": layers [0, fusion_layer) on token ids; mode="fusion": the remaining layers on
    ``states`` with cross-attention to ``context``. ALBEF's fusion passes the text mode's output as
    states and the image tokens as context; MAMO's image stream swaps the two (vlfast.models.Mamo)."""

    def __init__(self, config: TextConfig = TextConfig()):
        super().__init__()
        if not 0 <= config.fusion_layer <= config.depth or config.width % config.heads:
            raise ValueError(f"need 0 <= fusion_layer <= depth and width a multiple of heads: {config}")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.apply(init_weights)

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, *,
                mode: str = "text", states: Optional[Tensor] = None, context: Optional[Tensor] = None,
                context_mask: Optional[Tensor] = None) -> Tensor:
        """attention_mask (of input_ids or states) / context_mask: (B, L) with 1 (True) at real
        tokens, as Hugging Face's; None: every token is real."""
        mask = None if attention_mask is None else attention_mask.bool()
        context_mask = None if context_mask is None else context_mask.bool()
        if mode == "text":
            x, layers = self.embeddings(input_ids), self.encoder.layer[:self.config.fusion_layer]
        elif mode == "fusion":
            if states is None or context is None:
                raise ValueError("mode='fusion' needs states (e.g. the text mode's output) and the context they "
                                 "cross-attend to (e.g. image tokens)")
            x, layers = states, self.encoder.layer[self.config.fusion_layer:]
        else:
            raise ValueError(f"mode must be 'text' or 'fusion', got {mode!r}")
        for layer in layers:
            x = layer(x, mask, context, context_mask)
        return x


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: TextConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.width, config.width)
        self.transform.LayerNorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.width, config.vocab_size)
        self.decoder.weight = word_embeddings.weight  # tied, as in BERT
        self.bias = self.decoder.bias  # HF names it twice

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform.LayerNorm(F.gelu(self.transform.dense(x))))


class BertForMaskedLM(nn.Module):
    """BertModel plus the MLM head, with HF's `bert.` / `cls.predictions.` names."""

    def __init__(self, config: TextConfig = TextConfig()):
        super().__init__()
        self.bert = BertModel(config)
        self.cls = nn.Module()
        self.cls.predictions = BertLMPredictionHead(config, self.bert.embeddings.word_embeddings)

    def forward(self, *args, **kwargs) -> Tensor:
        return self.cls.predictions(self.bert(*args, **kwargs))
