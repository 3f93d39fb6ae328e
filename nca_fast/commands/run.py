"""``nca-fast run MODEL --size HxW --steps N --seed S --out FILE [--decoder FILE --scale S]``: roll
out a model from its seed state and write the final frame (``.png``) or a video of every K-th step
(``.gif``, ``.mp4``), optionally rendered at high resolution by a decoder."""
from __future__ import annotations

import re

import torch

from .. import media
from ..backend import BACKENDS
from ..decoders import decode, load_decoder, render_frames
from ..utils.checks import check_memory, device_arg
from ..utils.optional import optional_import
from . import described
from .info import BUILTINS, load_model

MAX_SIDE = 1 << 16
MAX_STEPS = 2**32  # the masks' step counter is 32 bits
MAX_FRAME_SIDE = {".png": 1 << 16, ".gif": 65535, ".mp4": 16384}  # pixels per side the format takes


def parse_size(text: str, flag: str = "--size"):
    """``"HxW"`` (or ``"N"`` for a square) -> ``(H, W)``; errors name ``flag``."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+)\s*)?", text)
    if not m:
        raise ValueError(f"{flag} must be HxW (e.g. 72x72) or N, got {text!r}")
    h, w = int(m[1]), int(m[2] or m[1])
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise ValueError(f"{flag} sides must be in 1..{MAX_SIDE}, got {h}x{w}")
    return h, w


def _check(args):
    """Every argument check, before any model is loaded or step run."""
    size = parse_size(args.size)
    for flag, value, low, high in (("--steps", args.steps, 0, MAX_STEPS), ("--every", args.every, 1, None),
                                   ("--batch", args.batch, 1, 1 << 16), ("--scale-up", args.scale_up, 1, 256),
                                   ("--seed", args.seed, 0, 2**64 - 1)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
        if high is not None and value > high:
            raise ValueError(f"{flag} must be <= {high}, got {value}")
    try:
        media.check_fps(args.fps)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    ext = media.check_output(args.out)
    if ext in media.IMAGE_EXTS and (args.every != 1 or args.fps != 30.0):
        raise ValueError(f"--every and --fps are for videos (.gif, .mp4): a {ext} holds the final frame")
    if ext not in media.IMAGE_EXTS and 0 < args.steps < args.every:
        raise ValueError(f"--every {args.every} is more than --steps {args.steps}: the video would hold the "
                         "seed alone")
    device = device_arg(args.device)
    if args.scale is not None and args.decoder is None:
        raise ValueError("--scale needs --decoder (use --scale-up for nearest-neighbour upscaling)")
    if args.scale is not None and not 1 <= args.scale <= 256:
        raise ValueError(f"--scale must be in [1, 256], got {args.scale}")
    _check_frame(size, args.batch, args.scale or 1, args.scale_up, ext)
    return size, ext, device


def _check_frame(size, batch: int, scale: int, scale_up: int, ext: str) -> int:
    """The output frame's sides against what the format takes; returns its pixels."""
    (h, w), most = size, MAX_FRAME_SIDE[ext]
    fh, fw = h * scale * scale_up, batch * w * scale * scale_up
    if max(fh, fw) > most:
        fit = max(1, most // max(h * scale, batch * w * scale))
        raise ValueError(f"a {fw}x{fh}-pixel frame exceeds the {most} pixels per side a {ext} takes "
                         f"(--scale-up {fit} or less would fit)")
    return fh * fw


def _check_memory(model, decoder, size, args, ext, device, height, width) -> None:
    """Refuse, before the rollout, frames that cannot fit in memory: the decoded image (float), the
    8-bit frame, and for a GIF every frame (Pillow keeps them until it writes the file)."""
    scale = (size[0] // height) if size else (decoder.spec.scale if decoder is not None else 1)
    pixels = _check_frame((height, width), args.batch, scale, args.scale_up, ext)
    channels = decoder.spec.out_channels if decoder is not None else 3
    decoded = args.batch * channels * height * width * scale * scale * 4
    frames = 1 if ext != ".gif" else 1 + args.steps // args.every
    need = decoded + pixels * 3 + frames * pixels
    held = " (a GIF holds them all)" if ext == ".gif" else ""
    where = device if decoder is not None else torch.device("cpu")
    if where.type == device.type:  # the rollout's states share that memory: counted, so that the hint holds
        path = ("triton" if device.type == "cuda" and args.backend in ("auto", "triton")
                else "cpu" if device.type == "cpu" and args.backend in ("auto", "cpu") else "reference")
        need += args.batch * height * width * (model.spec.channels * 4 + model.rollout_bytes_per_cell(torch.float32,
                                                                                                        path))
    check_memory(need, where, f"{frames} frame{'s' * (frames > 1)} of {pixels / 1e6:.3g} Mpixel{held} and the states",
                 per_cell=-(-need // (height * width)))


def _load_decoder(args, model, device):
    """The decoder and the output size it renders at (None: its own scale)."""
    decoder = load_decoder(args.decoder).to(device)
    if decoder.spec.channels != model.spec.channels:
        raise ValueError(f"decoder {args.decoder} takes {decoder.spec.channels} channels, the model has "
                         f"{model.spec.channels}")
    if args.scale is None or args.scale == decoder.spec.scale:
        return decoder, None
    if decoder.spec.kind == "pixel_shuffle":
        raise ValueError(f"--scale {args.scale}: this pixel-shuffle decoder renders at scale "
                         f"{decoder.spec.scale} only")
    h, w = parse_size(args.size)
    return decoder, (h * args.scale, w * args.scale)


@torch.no_grad()
def run(args) -> int:
    (height, width), ext, device = _check(args)
    tqdm = optional_import("tqdm", "media").tqdm
    model = load_model(args.model, args.name).to(device)
    decoder, size = _load_decoder(args, model, device) if args.decoder else (None, None)
    _check_memory(model, decoder, size, args, ext, device, height, width)
    x = model.seed(args.batch, height, width, device=device)
    if decoder is None:
        frame = lambda state: media.to_frame(model.to_rgb(state), args.scale_up)
        stream = lambda: model.frames(x, args.steps, seed=args.seed, every=args.every,
                                      backend=args.backend)
    else:
        image = lambda state: decode(decoder, state, backend=args.backend, size=size)
        frame = lambda img: media.to_frame(img[:, :3], args.scale_up)
        stream = lambda: render_frames(model, decoder, x, args.steps, seed=args.seed,
                                       every=args.every, backend=args.backend, size=size)
    bar = tqdm(total=args.steps, unit="step", desc=model.spec.name or "nca", disable=None)
    with bar:
        if ext in media.IMAGE_EXTS:
            chunk, done = max(1, args.steps // 100), 0
            while done < args.steps:  # chunks keep the bar moving; start_step keeps the masks identical
                n = min(chunk, args.steps - done)
                x = model.rollout(x, n, seed=args.seed, start_step=done, backend=args.backend)
                done += n
                bar.update(n)
            media.write_png(args.out, frame(x if decoder is None else image(x)))
            n_frames = 1
        else:
            def frames():
                yield frame(x if decoder is None else image(x))  # the seed
                last = 0
                for k, out in stream():
                    bar.update(k - last)
                    last = k
                    yield frame(out)
                bar.update(args.steps - last)
            n_frames = media.write_video(args.out, frames(), args.fps)
    up = args.scale_up * (1 if decoder is None else (size[0] // height if size else decoder.spec.scale))
    ph, pw = height * up, width * args.batch * up
    padded = ext == ".mp4" and (ph % 2 or pw % 2)  # (media.write_video: H.264's yuv420p takes even sides)
    print(f"wrote {args.out} ({n_frames} frame{'s' * (n_frames != 1)}, {ph}x{pw} pixels"
          + (f", padded to {ph + ph % 2}x{pw + pw % 2} by repeating the last row / column: H.264 takes even sides"
             if padded else "") + ")")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="roll out a model and write a PNG, GIF or MP4",
                       description=described(__doc__))
    p.add_argument("model", help="model file, or a built-in: " + ", ".join(BUILTINS))
    p.add_argument("--out", required=True, help="output file: .png (final frame), .gif or .mp4")
    p.add_argument("--name", help="model name inside a multi-model file (Distill textures)")
    p.add_argument("--size", default="72x72", help="grid size HxW (default 72x72)")
    p.add_argument("--steps", type=int, default=200, help="steps to run (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the update masks (default 0)")
    p.add_argument("--every", type=int, default=1, help="video: a frame every K steps (default 1)")
    p.add_argument("--batch", type=int, default=1, help="independent grids, side by side (default 1)")
    p.add_argument("--scale-up", type=int, default=1, metavar="K",
                   help="nearest-neighbour upscaling of frames, K pixels per cell (default 1)")
    p.add_argument("--fps", type=float, default=30.0, help="video frame rate (default 30)")
    p.add_argument("--decoder", help="render through this decoder file (pixel-shuffle or LPPN)")
    p.add_argument("--scale", type=int, help="decoder output pixels per cell (default: the decoder's)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="step backend (default auto)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=run)
