"""The GPU training core of Klein LoRA Lab. Imports no ComfyUI module; works on any torch module that carries
FLUX.2 [klein] module names (ComfyUI's loaded Flux2 diffusion model, or `tiny.TinyKlein`)."""
