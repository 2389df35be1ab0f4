"""Backbones and energy heads for energy-based models (torch only; no gin, no trainer)."""
from architectures.autoencoder import ConvAutoencoder
from architectures.bidirectional import BidirectionalConfig, BidirectionalTransformer
from architectures.ebt import EBT, ContextCache
from architectures.hnet import HNet, HNetConfig, HNetLM
from architectures.hnet_ebt import HNetContextCache, HNetContextEBT
from architectures.heads import LinearEnergyHead, LMHead, MeanPatchEnergyHead, QuadraticEnergyHead
from architectures.layers import (RMSNorm, RotaryEmbedding, SelfAttention, SwiGLU, TransformerBlock, attention, attention_bias,
                                  attention_with_self, causal_mask)
from architectures.transformer import PRESETS, ContinuousTransformerPP, KVCache, TransformerConfig, TransformerPP

__all__ = [
    "BidirectionalConfig", "BidirectionalTransformer", "ConvAutoencoder", "EBT", "ContextCache", "LinearEnergyHead",
    "LMHead", "MeanPatchEnergyHead", "QuadraticEnergyHead", "RMSNorm", "RotaryEmbedding", "SelfAttention", "SwiGLU",
    "TransformerBlock", "attention", "attention_bias", "attention_with_self", "causal_mask", "PRESETS", "KVCache",
    "TransformerConfig", "TransformerPP", "ContinuousTransformerPP", "HNet", "HNetConfig", "HNetLM", "HNetContextEBT",
    "HNetContextCache",
]
