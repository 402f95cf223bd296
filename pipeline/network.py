"""The segmentation network: MONAI's UNETR (Hatamizadeh et al. 2021), as in the paper.

MONAI's UNETR (1.6.1) fixes the ViT depth at 12 layers and the patch size at 16 voxels;
what can be set is the input size (multiple of 16), ``feature_size``, ``hidden_size``,
``mlp_dim``, ``num_heads`` (must divide ``hidden_size``), the norm, the residual blocks,
the dropout and ``qkv_bias``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

VIT_PATCH_VOXELS = 16  # MONAI UNETR's fixed patch size


@dataclass(frozen=True)
class NetworkSettings:
    """UNETR hyper-parameters. ``img_size`` is the sliding-window patch (voxels, z/y/x)."""

    img_size: tuple[int, int, int] = (96, 96, 96)
    feature_size: int = 16
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12
    norm_name: str = "instance"
    res_block: bool = True
    dropout_rate: float = 0.0
    qkv_bias: bool = False
    in_channels: int = 1

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.img_size)
        if len(size) != 3 or any(s <= 0 or s % VIT_PATCH_VOXELS for s in size):
            raise ValueError(
                f"NetworkSettings.img_size must be three positive multiples of {VIT_PATCH_VOXELS}; saw {self.img_size!r}"
            )
        object.__setattr__(self, "img_size", size)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"NetworkSettings.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.dropout_rate <= 1.0:
            raise ValueError(f"NetworkSettings.dropout_rate must be in [0, 1]; saw {self.dropout_rate}")

    def to_dict(self) -> dict:
        return {
            "img_size": list(self.img_size),
            "feature_size": self.feature_size,
            "hidden_size": self.hidden_size,
            "mlp_dim": self.mlp_dim,
            "num_heads": self.num_heads,
            "norm_name": self.norm_name,
            "res_block": self.res_block,
            "dropout_rate": self.dropout_rate,
            "qkv_bias": self.qkv_bias,
            "in_channels": self.in_channels,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "NetworkSettings":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if "img_size" in known:
            known["img_size"] = tuple(int(s) for s in known["img_size"])
        return cls(**known)

    def unetr_kwargs(self, num_classes: int) -> dict:
        """Keyword arguments of ``monai.networks.nets.UNETR`` (JSON-serialisable)."""
        return {
            "in_channels": self.in_channels,
            "out_channels": int(num_classes),
            "img_size": list(self.img_size),
            "feature_size": self.feature_size,
            "hidden_size": self.hidden_size,
            "mlp_dim": self.mlp_dim,
            "num_heads": self.num_heads,
            "proj_type": "conv",
            "norm_name": self.norm_name,
            "res_block": self.res_block,
            "dropout_rate": self.dropout_rate,
            "qkv_bias": self.qkv_bias,
        }


#: The paper's network: UNETR with a ViT-B encoder on 96³ patches.
PRODUCTION_NETWORK = NetworkSettings()

#: The shipped demonstration network: a small UNETR that trains on 2 CPU cores.
DEMO_NETWORK = NetworkSettings(img_size=(64, 64, 64), feature_size=12, hidden_size=144, mlp_dim=576, num_heads=4)


def build_network(settings: NetworkSettings, num_classes: int):  # -> monai.networks.nets.UNETR
    """A freshly initialised UNETR for ``num_classes`` output channels (background included)."""
    from monai.networks.nets import UNETR

    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + structures); saw {num_classes}")
    return UNETR(**settings.unetr_kwargs(num_classes))
