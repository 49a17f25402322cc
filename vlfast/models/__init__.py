"""Models built on the vlfast ops: a timm-compatible ViT, HF-compatible BERT text/fusion encoders, MAMO."""
from vlfast.models.bert import BertForMaskedLM, BertModel, ContextCache, TextConfig
from vlfast.models.mamo import Mamo, MamoConfig
from vlfast.models.vit import VisionConfig, VisionTransformer, resample_pos_embed

__all__ = ["BertForMaskedLM", "BertModel", "ContextCache", "Mamo", "MamoConfig", "TextConfig", "VisionConfig", "VisionTransformer", "resample_pos_embed"]
