"""Tessera: a node-based workflow editor for diffusion and autoregressive image models."""

__version__ = "0.1.0"
