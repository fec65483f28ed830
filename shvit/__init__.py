"""SHViT reference models (the authors' network, module names and checkpoints)."""
from .checkpoint import load_checkpoint, official_to_timm, timm_to_official
from .layers import (
    FFN,
    SHSA,
    SHSAInference,
    BasicBlock,
    BN_Linear,
    Conv2d_BN,
    GroupNorm,
    PatchMerging,
    Residual,
    SqueezeExcite,
)
from .model import VARIANTS, SHViT, create_model, shvit_s1, shvit_s2, shvit_s3, shvit_s4

__all__ = [
    "SHViT",
    "SHSA",
    "SHSAInference",
    "BasicBlock",
    "Conv2d_BN",
    "BN_Linear",
    "Residual",
    "FFN",
    "SqueezeExcite",
    "PatchMerging",
    "GroupNorm",
    "VARIANTS",
    "create_model",
    "shvit_s1",
    "shvit_s2",
    "shvit_s3",
    "shvit_s4",
    "load_checkpoint",
    "official_to_timm",
    "timm_to_official",
]
