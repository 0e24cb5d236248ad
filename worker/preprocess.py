"""RGB Pillow image -> normalized float32 CHW array for BLIP, without torch or the processor's overhead.

"stretch" reproduces ``BlipImageProcessor``: one Pillow resize of the uint8 image, then
``(x * rescale_factor - mean) / std``. The affine step is a per-channel 256-entry lookup table, so
each output value is computed once in float64 and rounded to float32 (the processor computes it
in float32 arithmetic; measured difference at most 2.4e-7).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from imgq.contract import ResizeMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Preprocessor:
    """Callable from worker threads: it holds only read-only state."""

    def __init__(
        self,
        size: int = 384,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        resample: int = Image.BICUBIC,
        rescale_factor: float = 1 / 255,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError("mean and std need three values each, std positive")
        self.size = size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resample = Image.Resampling(int(resample))
        self.rescale_factor = float(rescale_factor)
        levels = np.arange(256, dtype=np.float64) * self.rescale_factor
        self._lut = ((levels[None, :] - np.array(self.mean)[:, None]) / np.array(self.std)[:, None]).astype(
            np.float32
        )

    @classmethod
    def from_image_processor(cls, image_processor: Any) -> Preprocessor:
        """Mirror a transformers ``BlipImageProcessor`` / ``BlipImageProcessorPil`` configuration."""
        p = image_processor
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if not getattr(p, flag, True):
                raise ValueError(f"image processor has {flag}=False; Preprocessor always does it")
        if getattr(p, "do_center_crop", False):
            raise ValueError("image processor centre-crops; Preprocessor does not mirror that")
        height, width = _hw(p.size)
        if height != width:
            raise ValueError(f"only square inputs are supported, got {height}x{width}")
        mean, std = p.image_mean, p.image_std
        if isinstance(mean, int | float):
            mean = (mean,) * 3
        if isinstance(std, int | float):
            std = (std,) * 3
        return cls(
            size=height,
            mean=mean,
            std=std,
            resample=int(p.resample),
            rescale_factor=p.rescale_factor,
        )

    def __call__(self, image: Image.Image, mode: ResizeMode = "stretch") -> np.ndarray:
        """Return a C-contiguous float32 array of shape (3, size, size)."""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image (see imgq.worker.decode), got mode {image.mode!r}")
        n = self.size
        w, h = image.size
        if mode == "stretch":
            return self._normalize(image.resize((n, n), self.resample))
        if mode == "center_crop":
            # Resample only the centred square: same picture as resize-shortest-then-crop,
            # one resampling pass, and no work spent on pixels that are cut away.
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            box = (left, top, left + side, top + side)
            return self._normalize(image.resize((n, n), self.resample, box=box))
        if mode == "letterbox":
            scale = n / max(w, h)
            nw, nh = max(1, min(n, round(w * scale))), max(1, min(n, round(h * scale)))
            # Pad after normalizing: padding is exactly 0 (the mean), which no uint8 fill could give.
            out = np.zeros((3, n, n), dtype=np.float32)
            x0, y0 = (n - nw) // 2, (n - nh) // 2
            out[:, y0 : y0 + nh, x0 : x0 + nw] = self._normalize(image.resize((nw, nh), self.resample))
            return out
        raise ValueError(f"unknown resize mode {mode!r}; expected stretch, center_crop or letterbox")

    def pixels(self, image: Image.Image, mode: ResizeMode = "stretch") -> np.ndarray:
        """What the worker carries to the model: uint8 (3, size, size) for stretch and center_crop,
        normalised on the model's device (4x less host memory and transfer than float32);
        float32 for letterbox, whose padding must normalise to exactly 0."""
        if mode == "letterbox":
            return self(image, mode)
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image (see imgq.worker.decode), got mode {image.mode!r}")
        n = self.size
        if mode == "stretch":
            resized = image.resize((n, n), self.resample)
        elif mode == "center_crop":
            w, h = image.size
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            resized = image.resize((n, n), self.resample, box=(left, top, left + side, top + side))
        else:
            raise ValueError(f"unknown resize mode {mode!r}; expected stretch, center_crop or letterbox")
        return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))

    def _normalize(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image, dtype=np.uint8)  # HWC
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for c in range(3):  # table look-up writes straight into the CHW planes: no temporaries
            np.take(self._lut[c], pixels[..., c], out=out[c])
        return out


def _hw(size: Any) -> tuple[int, int]:
    """Height and width from a processor ``size`` (a dict or transformers' ``SizeDict``)."""
    get = size.get if isinstance(size, Mapping) else lambda key: getattr(size, key, None)
    height, width = get("height"), get("width")
    if height is None or width is None:  # e.g. shortest_edge: a different resize than "stretch"
        raise ValueError(f"expected a height and width in the processor size, got {size!r}")
    return int(height), int(width)
