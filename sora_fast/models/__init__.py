"""Models on packed spacetime patches: the video DiT, the causal VAE and the text encoders.

They call only :mod:`sora_fast.ops`, so they speed up by themselves as kernel backends land.
"""
from .dit import DiTConfig, VideoDiT
from .text import T5TextEncoder, TextEncoder, TinyTextConfig, TinyTextEncoder, load_text_encoder
from .vae import CausalVAE, VAEConfig

__all__ = ["DiTConfig", "VideoDiT", "CausalVAE", "VAEConfig", "TextEncoder", "TinyTextEncoder", "TinyTextConfig",
           "T5TextEncoder", "load_text_encoder"]
