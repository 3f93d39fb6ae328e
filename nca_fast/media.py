"""Writing rollouts as images and videos: PNG (Pillow), GIF (Pillow), MP4 (imageio-ffmpeg).

Frames are ``uint8 [H, W, 3]`` numpy arrays. Videos are written from an iterator, one frame at a
time (MP4 streams to ffmpeg; Pillow's GIF writer keeps the palettised frames until it finishes),
to a temporary file that replaces ``path`` only once complete.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .io.errors import optional_import

IMAGE_EXTS = (".png",)
VIDEO_EXTS = (".gif", ".mp4")


def check_output(path) -> str:
    """Validate an output path before any work: its extension, folder and libraries. Returns the
    lower-case extension."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTS + VIDEO_EXTS:
        raise ValueError(f"output {str(path)!r}: unknown extension {ext or '(none)'!r}; "
                         f"use one of {', '.join(IMAGE_EXTS + VIDEO_EXTS)}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    optional_import("PIL.Image", "formats")
    if ext == ".mp4":
        optional_import("imageio", "media")
        try:
            optional_import("imageio_ffmpeg", "media").get_ffmpeg_exe()
        except RuntimeError as e:
            raise RuntimeError(f"MP4 output needs an ffmpeg binary: {e}") from None
    return ext


def to_frame(rgb: torch.Tensor, scale: int = 1) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] -> ``uint8 [H*scale, B*W*scale, 3]``, the batch side by side,
    each cell a ``scale x scale`` block (nearest neighbour)."""
    img = (rgb.clamp(0, 1) * 255).round().to(torch.uint8)  # [B, 3, H, W]
    img = img.permute(2, 0, 3, 1).flatten(1, 2)  # [H, B*W, 3]
    if scale > 1:
        img = img.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return img.cpu().numpy()


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` (same extension) that replaces it on success."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_png(path, frame: np.ndarray) -> None:
    Image = optional_import("PIL.Image", "formats")
    path = Path(path)
    with _atomic(path) as tmp:
        Image.fromarray(frame).save(tmp, format="PNG")


def write_video(path, frames: Iterable[np.ndarray], fps: float) -> int:
    """Write ``frames`` to a ``.gif`` or ``.mp4``; returns the number of frames written."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in VIDEO_EXTS:
        raise ValueError(f"{path}: not a video extension ({', '.join(VIDEO_EXTS)})")
    count = 0

    def counted():
        nonlocal count
        for f in frames:
            count += 1
            yield f

    with _atomic(path) as tmp:
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
    writer = imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="error")
    try:
        for f in frames:
            # yuv420p needs even sizes: repeat the last row / column rather than resample.
            pad = ((0, f.shape[0] % 2), (0, f.shape[1] % 2), (0, 0))
            writer.append_data(np.pad(f, pad, mode="edge") if any(p[1] for p in pad) else f)
    finally:
        writer.close()
