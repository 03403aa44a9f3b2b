"""Media files: PNG and MP4 writing, contact sheets, and reading images and videos for data preparation.

SPEC-rcm §6 (samples to look at) and §11.1 (pixels the VAE encodes into training latents). Frames are
uint8 tensors [T, H, W, 3] (RGB); model pixels are float [3, T, H, W] in [-1, 1]. PNG goes through
Pillow (a matplotlib dependency, always present); MP4 reading and writing through PyAV, installed by
the `media` extra and imported only when a video is touched. Every file is written under a temporary
name and renamed into place.
"""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from rcmfn.atomic import write_atomically

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi")


class MediaError(ValueError):
    """A media file cannot be read, or does not fit the requested size; the message names the file."""


def require_av():
    """PyAV, or ImportError saying how to install it (videos are an optional feature)."""
    try:
        import av
    except ImportError as err:
        raise ImportError("reading or writing video needs PyAV: pip install 'rcmfn[media]'") from err
    return av


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Model pixels [3, T, H, W] in [-1, 1] -> frames uint8 [T, H, W, 3]; NaN becomes mid grey."""
    if pixels.dim() != 4 or pixels.shape[0] != 3:
        raise ValueError(f"pixels must be [3, T, H, W]; got {tuple(pixels.shape)}")
    scaled = (torch.nan_to_num(pixels.detach().float().cpu(), nan=0.0) + 1.0) * 127.5
    return scaled.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous()


def to_pixels(frames: torch.Tensor) -> torch.Tensor:
    """Frames uint8 [T, H, W, 3] -> model pixels float32 [3, T, H, W] in [-1, 1]."""
    check_frames(frames)
    return frames.permute(3, 0, 1, 2).float() / 127.5 - 1.0


def check_frames(frames: torch.Tensor) -> None:
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be uint8 [T >= 1, H, W, 3]; got {frames.dtype} {tuple(frames.shape)}")


_atomic = write_atomically  # (path, write) -> path


def write_png(path: str | os.PathLike, image: torch.Tensor) -> Path:
    """Write one uint8 image [H, W, 3] (or a single frame [1, H, W, 3]) as PNG."""
    image = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
    check_frames(image[None])
    array = image.cpu().numpy()
    return _atomic(Path(path), lambda tmp: Image.fromarray(array, "RGB").save(tmp, format="PNG"))


def write_mp4(
    path: str | os.PathLike, frames: torch.Tensor, fps: int = 16, crf: int = 18, codec: str = "libx264"
) -> Path:
    """Write frames uint8 [T, H, W, 3] as an H.264 (yuv420p) MP4; H and W must be even (4:2:0)."""
    check_frames(frames)
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"MP4 (yuv420p) needs even height and width; got {height} x {width}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1; got {fps}")
    av = require_av()
    if codec not in av.codecs_available:
        raise ValueError(f"video codec {codec!r} is not in this PyAV build")

    def write(tmp: str) -> None:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)} if codec == "libx264" else {}
            for frame in frames.cpu().numpy():
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())

    return _atomic(Path(path), write)


def write_media(path_stem: str | os.PathLike, frames: torch.Tensor, fps: int = 16) -> Path:
    """PNG for a single frame, MP4 otherwise; returns the path written (stem + suffix)."""
    stem = Path(path_stem)
    if frames.shape[0] == 1:
        return write_png(stem.with_suffix(".png"), frames)
    return write_mp4(stem.with_suffix(".mp4"), frames, fps)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as frames uint8 [1, H, W, 3] (RGB); MediaError if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise MediaError(f"{path}: unreadable image ({err})") from err
    return torch.from_numpy(array.copy())[None]


def read_video(path: str | os.PathLike, num_frames: int | None = None, stride: int = 1) -> torch.Tensor:
    """Every `stride`-th frame of a video, at most `num_frames`, as uint8 [T, H, W, 3] (RGB)."""
    if stride < 1 or (num_frames is not None and num_frames < 1):
        raise ValueError(f"need stride >= 1 and num_frames >= 1 or None; got {stride}, {num_frames}")
    av = require_av()
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                if index % stride == 0:
                    frames.append(frame.to_ndarray(format="rgb24"))
                if num_frames is not None and len(frames) == num_frames:
                    break
    except (av.FFmpegError, OSError, ValueError) as err:
        if isinstance(err, MediaError):
            raise
        raise MediaError(f"{path}: unreadable video ({err})") from err
    if not frames:
        raise MediaError(f"{path}: the video has no decodable frames")
    return torch.from_numpy(np.stack(frames))


def read_media(path: str | os.PathLike, num_frames: int | None = None, stride: int = 1) -> torch.Tensor:
    """Read an image or a video by its suffix (IMAGE_SUFFIXES, VIDEO_SUFFIXES) as uint8 [T, H, W, 3]."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return read_image(path)
    if suffix in VIDEO_SUFFIXES:
        return read_video(path, num_frames, stride)
    raise MediaError(f"{path}: unknown media suffix {suffix!r}; images {IMAGE_SUFFIXES}, videos {VIDEO_SUFFIXES}")


def fit_frames(
    frames: torch.Tensor, num_frames: int, height: int, width: int, mode: str = "crop", source: str = "media"
) -> torch.Tensor:
    """Frames [T, H, W, 3] brought to exactly [num_frames, height, width, 3], or MediaError.

    The first `num_frames` frames are kept (fewer is an error). mode "exact": the size must already
    match. mode "crop": scale so the frame covers height x width (area average when shrinking, bilinear
    when enlarging), then crop the centre; the aspect ratio is kept, nothing is stretched.
    """
    check_frames(frames)
    if mode not in ("crop", "exact"):
        raise ValueError(f"mode must be 'crop' or 'exact'; got {mode!r}")
    if frames.shape[0] < num_frames:
        raise MediaError(f"{source}: {frames.shape[0]} frames, need {num_frames}")
    frames = frames[:num_frames]
    h, w = frames.shape[1:3]
    if (h, w) == (height, width):
        return frames
    if mode == "exact":
        raise MediaError(f"{source}: size {h} x {w} (H x W), need {height} x {width}")
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    x = frames.permute(0, 3, 1, 2).float()
    resized = (
        F.interpolate(x, size=size, mode="area")
        if scale < 1
        else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    )
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    cropped = resized[:, :, top : top + height, left : left + width]
    return cropped.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """`text`, cut with an ellipsis so it is at most `width` pixels wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(
    rows: Mapping[str, Sequence[torch.Tensor]], column_labels: Sequence[str] = (), pad: int = 4
) -> torch.Tensor:
    """One uint8 image [H, W, 3]: a labelled grid, one row per entry of `rows` (e.g. a sampler), one
    column per image (e.g. a prompt and seed). Every image is uint8 [h, w, 3] of one common size."""
    images = [img for row in rows.values() for img in row]
    if not images:
        raise ValueError("contact sheet needs at least one image")
    h, w = images[0].shape[:2]
    if any(tuple(img.shape) != (h, w, 3) or img.dtype != torch.uint8 for img in images):
        raise ValueError(f"contact sheet images must all be uint8 [{h}, {w}, 3]")
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + pad
    label_w = int(max(probe.textlength(name, font=font) for name in rows)) + 2 * pad
    cols = max(len(row) for row in rows.values())
    top = line if column_labels else 0
    sheet = Image.new("RGB", (label_w + cols * (w + pad), top + len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(list(column_labels)[:cols]):
        draw.text((label_w + c * (w + pad), 0), _fit_text(draw, label, font, w), fill="black", font=font)
    for r, (name, row) in enumerate(rows.items()):
        y = top + r * (h + pad)
        draw.text((pad, y + h // 2 - line // 2), name, fill="black", font=font)
        for c, img in enumerate(row):
            sheet.paste(Image.fromarray(img.cpu().numpy(), "RGB"), (label_w + c * (w + pad), y))
    return torch.from_numpy(np.asarray(sheet).copy())
