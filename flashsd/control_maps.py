"""Control maps made from the photo a user sends: canny edges and depth, as the ControlNets were trained on them.

- canny: exactly jasperai/flash-sdxl's card (section "Combining Flash Diffusion with Existing ControlNets"), which
  follows diffusers/controlnet-canny-sdxl-1.0's card: `cv2.Canny(np.array(image), 100, 200)` on the RGB photo, the
  one-channel edges stacked to 3 channels.
- depth: Depth Anything V2 Small (transformers' DepthAnythingForDepthEstimation and its DPT image processor),
  normalised as diffusers/controlnet-depth-sdxl-1.0's card does with its depth estimator: the predicted depth
  resized (bicubic) to the output size, scaled to 0-1 by its own minimum and maximum, stacked to 3 channels, x255.
  (Depth Anything predicts relative inverse depth, near = large, the convention of the MiDaS/DPT maps the depth
  ControlNets were trained on.)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from .runtime import Runtime

CANNY_LOW_THRESHOLD, CANNY_HIGH_THRESHOLD = 100, 200  # the card's


def canny_map(image: Image.Image) -> Image.Image:
    """The card's canny map of `image` (RGB), at its size: white edges on black, 3 channels."""
    import cv2

    edges = cv2.Canny(np.array(image.convert("RGB")), CANNY_LOW_THRESHOLD, CANNY_HIGH_THRESHOLD)
    return Image.fromarray(np.concatenate([edges[:, :, None]] * 3, axis=2))


class DepthEstimator:
    """Depth Anything V2 Small, loaded once on the engine's device in its dtype."""

    def __init__(self, model, processor, runtime: Runtime):
        self.model = model
        self.processor = processor
        self.runtime = runtime

    @classmethod
    def load(cls, folder: Path, runtime: Runtime) -> DepthEstimator:
        from transformers import DepthAnythingForDepthEstimation, DPTImageProcessorPil

        model = DepthAnythingForDepthEstimation.from_pretrained(
            folder, dtype=runtime.dtype, use_safetensors=True, local_files_only=True
        )
        model.to(runtime.device).eval()
        # The PIL implementation explicitly: the default one needs torchvision, which flashsd does not install.
        processor = DPTImageProcessorPil.from_pretrained(folder, local_files_only=True)
        return cls(model, processor, runtime)

    def depth_map(self, image: Image.Image) -> Image.Image:
        """The depth map of `image` (RGB) at its size, normalised as the depth ControlNet's card does."""
        import torch

        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
        with torch.no_grad():
            depth = self.model(pixel_values=pixels.to(self.runtime.device, self.runtime.dtype)).predicted_depth
            depth = torch.nn.functional.interpolate(
                depth.float().unsqueeze(1), size=(image.height, image.width), mode="bicubic", align_corners=False
            )
            low = torch.amin(depth, dim=[1, 2, 3], keepdim=True)
            high = torch.amax(depth, dim=[1, 2, 3], keepdim=True)
            depth = (depth - low) / (high - low)  # a flat prediction gives NaN: clipped to 0 below, a black map
            depth = torch.cat([depth] * 3, dim=1).permute(0, 2, 3, 1).cpu().numpy()[0]
        return Image.fromarray((np.nan_to_num(depth) * 255.0).clip(0, 255).astype(np.uint8))
