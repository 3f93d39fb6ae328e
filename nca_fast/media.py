"""Images and videos: reading images (Pillow), writing PNG / GIF (Pillow) and MP4 (imageio-ffmpeg).

Frames are ``uint8 [H, W, 3]`` numpy arrays. Videos are written from an iterator, one frame at a
time (MP4 streams to ffmpeg; Pillow's GIF writer keeps the palettised frames until it finishes), to
a temporary file that replaces the output only once complete (:func:`nca_fast.files.atomic_output`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .utils.files import MAX_IMAGE_BYTES, InputFileError, atomic_output, open_input
from .utils.files import check_output as check_output_path
from .utils.optional import optional_import

IMAGE_EXTS = (".png",)
VIDEO_EXTS = (".gif", ".mp4")
MAX_IMAGE_PIXELS = 1 << 26  # 64 Mpixel: an 8K frame is 33 Mpixel
MIN_FPS, MAX_FPS = 0.01, 1000.0


def check_output(path) -> str:
    """Validate an output path before any work: its extension, folder and libraries. Returns the
    lower-case extension."""
    path = check_output_path(path, IMAGE_EXTS + VIDEO_EXTS)
    ext = path.suffix.lower()
    optional_import("PIL.Image", "formats")
    if ext == ".mp4":
        optional_import("imageio", "media")
        try:
            optional_import("imageio_ffmpeg", "media").get_ffmpeg_exe()
        except RuntimeError as e:
            raise RuntimeError(f"MP4 output needs an ffmpeg binary: {e}") from None
    return ext


def check_fps(fps: float) -> float:
    if not (isinstance(fps, (int, float)) and fps > 0):
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if not MIN_FPS <= fps <= MAX_FPS:
        raise ValueError(f"fps must be in [{MIN_FPS:g}, {MAX_FPS:g}] frames per second, got {fps!r}")
    return float(fps)


def load_image(path) -> torch.Tensor:
    """An image file -> ``[K, H, W]`` float in [0, 1] (K = 4 when it has alpha, else 3). The file is
    bounded in bytes and in pixels (checked from its header, before decoding)."""
    Image = optional_import("PIL.Image", "formats")
    with open_input(path, limit=MAX_IMAGE_BYTES, what="image file") as f:
        try:
            with Image.open(f) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise InputFileError(path, f"image of {im.width}x{im.height} pixels, more than the "
                                               f"{MAX_IMAGE_PIXELS} this reads")
                if im.mode in ("I", "F") or im.mode.startswith("I;16"):  # 16/32-bit grey, float grey
                    return _wide_grey(im)
                has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
                im = im.convert("RGBA" if has_alpha else "RGB")
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                t = data.view(im.height, im.width, len(im.getbands()))
        except Image.DecompressionBombError as e:
            raise InputFileError(path, f"image too large ({str(e)[:200]})") from None
        except (OSError, SyntaxError, ValueError) as e:
            if isinstance(e, InputFileError):
                raise
            raise InputFileError(path, f"not a readable image ({type(e).__name__}: {str(e)[:200]})") from None
    return t.permute(2, 0, 1).float() / 255.0


def _wide_grey(im) -> torch.Tensor:
    """A 16-bit, 32-bit integer or float grey image as ``[3, H, W]`` in [0, 1] (``convert("RGB")``
    would clip it to 8 bits): 16-bit by its range, 32-bit integers by 65535 (or 255 when every value
    fits in 8 bits), floats as they are, clipped; ``[4, H, W]`` with a transparent value."""
    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        scale = 1.0
    elif im.mode == "I" and (a.size == 0 or a.max() <= 255):
        scale = 255.0
    else:
        scale = 65535.0
    g = torch.from_numpy(np.nan_to_num(a / scale).clip(0, 1)).float()
    rgb = g.expand(3, *g.shape)
    key = im.info.get("transparency")
    if isinstance(key, bool) or not isinstance(key, (int, float)):
        return rgb.clone()
    alpha = torch.from_numpy(a != key).float()  # (its one transparent value)
    return torch.cat([rgb, alpha[None]])


def to_frame(rgb: torch.Tensor, scale: int = 1) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] -> ``uint8 [H*scale, B*W*scale, 3]``, the batch side by side,
    each cell a ``scale x scale`` block (nearest neighbour)."""
    img = (rgb.clamp(0, 1) * 255).round().to(torch.uint8)  # [B, 3, H, W]
    img = img.permute(2, 0, 3, 1).flatten(1, 2)  # [H, B*W, 3]
    if scale > 1:
        img = img.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return img.cpu().numpy()


def write_png(path, frame: np.ndarray) -> None:
    Image = optional_import("PIL.Image", "formats")
    with atomic_output(path) as tmp:
        Image.fromarray(frame).save(tmp, format="PNG")


def write_video(path, frames: Iterable[np.ndarray], fps: float) -> int:
    """Write ``frames`` to a ``.gif`` or ``.mp4``; returns the number of frames written."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in VIDEO_EXTS:
        raise ValueError(f"{path}: not a video extension ({', '.join(VIDEO_EXTS)})")
    fps = check_fps(fps)
    count = 0

    def counted():
        nonlocal count
        for f in frames:
            count += 1
            yield f

    with atomic_output(path) as tmp:
        (_write_gif if ext == ".gif" else _write_mp4)(tmp, counted(), fps)
    return count


def _write_gif(tmp: Path, frames: Iterator[np.ndarray], fps: float) -> None:
    Image = optional_import("PIL.Image", "formats")
    images = (Image.fromarray(f) for f in frames)
    first = next(images, None)
    if first is None:
        raise ValueError("no frames to write")
    first.save(tmp, format="GIF", save_all=True, append_images=images, loop=0,
               duration=max(20, round(1000 / fps)))  # browsers treat < 20 ms as 100 ms


def _write_mp4(tmp: Path, frames: Iterator[np.ndarray], fps: float) -> None:
    imageio = optional_import("imageio.v2", "media")
    try:
        writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                    pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="error")
    except (OSError, RuntimeError) as e:
        raise RuntimeError(f"cannot start ffmpeg for {tmp.name}: {str(e)[:300]}") from None
    try:
        for f in frames:
            # yuv420p needs even sizes: repeat the last row / column rather than resample.
            pad = ((0, f.shape[0] % 2), (0, f.shape[1] % 2), (0, 0))
            writer.append_data(np.pad(f, pad, mode="edge") if any(p[1] for p in pad) else f)
    except (OSError, BrokenPipeError) as e:
        raise RuntimeError(f"ffmpeg failed writing {tmp.name}: {str(e)[:300]}") from None
    finally:
        try:
            writer.close()
        except (OSError, RuntimeError) as e:  # a broken ffmpeg fails again on close
            raise RuntimeError(f"ffmpeg failed writing {tmp.name}: {str(e)[:300]}") from None
