"""Model engines: DiT + VAE (diffusion) and VQ + GPT (autoregressive); no runtime imports."""
