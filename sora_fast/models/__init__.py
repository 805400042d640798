"""Models on packed spacetime patches: the video DiT, the causal VAE and the text encoders.

They call only :mod:`sora_fast.ops`, so they speed up by themselves as kernel backends land.
"""
