"""The one ComfyUI support package: every node file reaches ComfyUI through these modules."""
