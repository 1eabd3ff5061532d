"""flashsd: Flash Diffusion (SDXL, SD3, SD1.5, PixArt-α) in 4 steps, served with Cog."""
