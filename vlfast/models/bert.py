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
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlfast.models.init import init_weights
from vlfast.ops import attention, dropout_add_layer_norm, indexed_attention


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
    if (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)  # (none on the meta device)
            and x.is_floating_point() and x.dtype != torch.float64):  # autocast skips fp64
        return x.to(torch.get_autocast_dtype(device))
    return x


@dataclass
class ContextCache:
    """The cross-attention keys and values of I contexts (e.g. images), each fusion layer's, computed
    once (BertModel.context_cache) so that many states attend to them by index (the text stream
    of retrieval's pairs, of ITM's and MLM's pairs in a step) without recomputing their key and
    value projections per pair: keys[l], values[l] (I, H, Lk, Dh) for the l-th fusion layer, with
    the contexts' key padding mask (I, Lk) or None."""
    keys: List[Tensor]
    values: List[Tensor]
    mask: Optional[Tensor]

    def __len__(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class CachedContext(NamedTuple):
    """One layer's cached keys and values, and the entry each row of the states reads."""
    keys: Tensor
    values: Tensor
    index: Tensor


def _heads(t: Tensor, heads: int) -> Tensor:  # (B, L, W) -> (B, H, L, W / H)
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


class BertSelfAttention(nn.Module):
    def __init__(self, config: TextConfig, key_width: int):
        super().__init__()
        self.heads = config.heads
        self.query = nn.Linear(config.width, config.width)
        self.key = nn.Linear(key_width, config.width)
        self.value = nn.Linear(key_width, config.width)

    def forward(self, x: Tensor, context: Union[Tensor, CachedContext], key_padding_mask: Optional[Tensor]) -> Tensor:
        """``context``: the tokens attended to, or a CachedContext (their keys and values, read
        through its index by vlfast.ops.indexed_attention; key_padding_mask is then the cache's)."""
        # One cast per input under autocast, not one per projection: autocast caches weights' casts
        # only, so query, key and value would each cast the same fp32 states. The forward's numbers
        # are the same; the backward sums the three projections' input gradients in bf16 before the
        # one cast back (as autocast does for a weight used several times), not in fp32 after three.
        if isinstance(context, CachedContext):
            x = _autocast_input(x)
            out = indexed_attention(_heads(self.query(x), self.heads), context.keys, context.values, context.index,
                                    key_padding_mask=key_padding_mask)
            return out.transpose(1, 2).reshape(x.shape)
        x, context = (_autocast_input(x),) * 2 if context is x else (_autocast_input(x), _autocast_input(context))
        keys, values = self.keys_and_values(context)
        out = attention(_heads(self.query(x), self.heads), keys, values, key_padding_mask=key_padding_mask)
        return out.transpose(1, 2).reshape(x.shape)

    def keys_and_values(self, context: Tensor) -> Tuple[Tensor, Tensor]:
        """(keys, values), (B, H, L, Dh) each, of context tokens (B, L, key_width) already cast."""
        return _heads(self.key(context), self.heads), _heads(self.value(context), self.heads)


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

    def forward(self, x, context, key_padding_mask, first_only: bool = False):
        """``first_only``: the output at x's first position alone (its keys and values still all of context)."""
        states = x[:, :1] if first_only else x
        return self.output(self.self(states, context, key_padding_mask), states)


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

    def forward(self, x, mask, context=None, context_mask=None, first_only: bool = False):
        """``first_only``: the layer's output at the first position ([CLS]) alone, (B, 1, W)."""
        x = self.attention(x, x, mask, first_only)
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

    def context_cache(self, context: Tensor, context_mask: Optional[Tensor] = None) -> ContextCache:
        """Every fusion layer's cross-attention keys and values of ``context`` (I, L, encoder_width),
        for fusion passes that read them by index (``context_index`` of forward). Differentiable:
        a training step's backward sums each entry's gradient over the rows that read it."""
        context = _autocast_input(context)
        keys, values = [], []
        for layer in self.encoder.layer[self.config.fusion_layer:]:
            k, v = layer.crossattention.self.keys_and_values(context)  # (I, H, L, Dh) views of (I, L, W)
            keys.append(k)
            values.append(v)
        return ContextCache(keys, values, None if context_mask is None else context_mask.bool())

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, *,
                mode: str = "text", states: Optional[Tensor] = None,
                context: Union[Tensor, ContextCache, None] = None, context_mask: Optional[Tensor] = None,
                context_index: Optional[Tensor] = None, cls_only: bool = False) -> Tensor:
        """attention_mask (of input_ids or states) / context_mask: (B, L) with 1 (True) at real
        tokens, as Hugging Face's; None: every token is real. ``context`` may be a ContextCache
        (context_cache), with ``context_index`` (B,) naming each row's entry: the fusion layers then
        read its keys and values (its own mask; context_mask must be None). ``cls_only``: the last
        layer computes the first position ([CLS]) alone and the output is (B, 1, W): what ITM
        reads, without the last layer's work at the other positions."""
        mask = None if attention_mask is None else attention_mask.bool()
        context_mask = None if context_mask is None else context_mask.bool()
        if isinstance(context, ContextCache):
            if context_index is None or context_mask is not None:
                raise ValueError("a ContextCache context takes context_index (one entry per row of states) and "
                                 "no context_mask (the cache holds its own)")
            if len(context.keys) != self.config.depth - self.config.fusion_layer:
                raise ValueError(f"the cache holds {len(context.keys)} fusion layers' keys, this model has "
                                 f"{self.config.depth - self.config.fusion_layer}")
        elif context_index is not None:
            raise ValueError("context_index reads a ContextCache (BertModel.context_cache), not context tokens")
        if mode == "text":
            x, layers = self.embeddings(input_ids), self.encoder.layer[:self.config.fusion_layer]
        elif mode == "fusion":
            if states is None or context is None:
                raise ValueError("mode='fusion' needs states (e.g. the text mode's output) and the context they "
                                 "cross-attend to (e.g. image tokens)")
            x, layers = states, self.encoder.layer[self.config.fusion_layer:]
        else:
            raise ValueError(f"mode must be 'text' or 'fusion', got {mode!r}")
        for depth, layer in enumerate(layers):
            last = cls_only and depth == len(layers) - 1
            if isinstance(context, ContextCache):
                x = layer(x, mask, CachedContext(context.keys[depth], context.values[depth], context_index), context.mask,
                          first_only=last)
            else:
                x = layer(x, mask, context, context_mask, first_only=last)
        return x[:, :1] if cls_only else x  # (no layers: the states' own first position)


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
