"""Tests for rcmfn/media.py: pixel conversions, PNG/MP4 round trips, fitting, contact sheets, bad files."""

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcmfn import media

needs_av = pytest.mark.skipif(
    importlib.util.find_spec("av") is None, reason="video tests need PyAV (pip install 'rcmfn[media]')"
)


def random_frames(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), generator=gen, dtype=torch.uint8)


def smooth_frames(t: int, h: int, w: int) -> torch.Tensor:
    """Horizontal and vertical ramps, blue level 20 i in frame i: H.264 keeps them within a few levels."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack(
        [torch.stack([x * 255 // w, y * 255 // h, torch.full_like(x, 20 * i)], -1) for i in range(t)]
    ).to(torch.uint8)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 9), seed=st.integers(0, 99))
def test_uint8_frames_survive_the_trip_through_model_pixels(t, h, w, seed):
    frames = random_frames(t, h, w, seed)
    pixels = media.to_pixels(frames)
    assert pixels.shape == (3, t, h, w) and pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(media.to_uint8(pixels), frames)


def test_to_uint8_clamps_and_turns_nan_into_mid_grey():
    pixels = torch.tensor([-3.0, -1.0, 0.0, float("nan"), 1.0, 7.0]).reshape(1, 1, 1, 6).expand(3, 1, 1, 6)
    assert media.to_uint8(pixels)[0, 0, :, 0].tolist() == [0, 0, 128, 128, 255, 255]
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        media.to_uint8(torch.zeros(4, 1, 2, 2))


def test_png_round_trip_is_exact(tmp_path):
    frame = random_frames(1, 5, 7)
    path = media.write_png(tmp_path / "sub" / "x.png", frame)
    assert torch.equal(media.read_image(path), frame)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.png"]  # no temporary left behind


@needs_av
def test_mp4_round_trip_keeps_size_count_and_content(tmp_path):
    frames = smooth_frames(9, 32, 48)
    path = media.write_mp4(tmp_path / "v.mp4", frames, fps=8)
    back = media.read_video(path)
    assert back.shape == frames.shape
    assert (back.float() - frames.float()).abs().mean() < 3.0
    assert (back[..., 2].float().mean((1, 2)) - 20 * torch.arange(9)).abs().max() < 3.0  # frame order kept
    strided = media.read_video(path, num_frames=3, stride=2)
    assert strided.shape[0] == 3 and (strided.float() - frames[0:6:2].float()).abs().mean() < 3.0
    assert media.write_media(tmp_path / "one", frames[:1]).suffix == ".png"
    assert media.write_media(tmp_path / "many", frames).suffix == ".mp4"


def test_write_mp4_rejects_odd_sizes_and_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="even height and width"):
        media.write_mp4(tmp_path / "v.mp4", random_frames(2, 5, 8))
    with pytest.raises(ValueError, match="uint8"):
        media.write_mp4(tmp_path / "v.mp4", torch.rand(2, 4, 4, 3))
    assert not list(tmp_path.iterdir())


VIDEO_NAMES = [pytest.param(name, marks=needs_av) for name in ("broken.mp4", "empty.webm")]


@pytest.mark.parametrize("name", ["broken.png", "empty.jpg", *VIDEO_NAMES])
def test_unreadable_media_raise_media_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else b"\x00garbage" * 20)
    with pytest.raises(media.MediaError, match=name):
        media.read_media(path, num_frames=4)


def test_unknown_suffix_is_a_media_error(tmp_path):
    with pytest.raises(media.MediaError, match="unknown media suffix '.gif'"):
        media.read_media(tmp_path / "a.gif")


@settings(max_examples=20, deadline=None)
@given(
    t=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    extra=st.integers(0, 3),
    wide=st.booleans(),
    seed=st.integers(0, 99),
)
def test_crop_fit_of_a_2x_upscaled_padded_frame_recovers_the_original(t, h, w, extra, wide, seed):
    """Shrinking by 2 averages the constant 2 x 2 blocks exactly; the padding is cropped symmetrically."""
    original = random_frames(t, h, w, seed)
    big = original.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    pad = random_frames(t, 2 * h, 2 * extra, seed + 1) if wide else random_frames(t, 2 * extra, 2 * w, seed + 1)
    dim = 2 if wide else 1
    source = torch.cat([pad, big, pad], dim=dim)
    fitted = media.fit_frames(torch.cat([source, source[:1]]), t, h, w, "crop")
    assert fitted.shape == original.shape
    assert (fitted.int() - original.int()).abs().max() <= 1


def test_crop_fit_enlarges_small_frames_without_changing_a_flat_colour():
    flat = torch.tensor([17, 140, 233], dtype=torch.uint8).expand(2, 3, 5, 3).contiguous()
    fitted = media.fit_frames(flat, 2, 8, 6)
    assert fitted.shape == (2, 8, 6, 3) and torch.equal(fitted, flat[:, :1, :1].expand(2, 8, 6, 3))


def test_fit_frames_exact_mode_and_frame_count_errors():
    frames = random_frames(3, 4, 6)
    assert torch.equal(media.fit_frames(frames, 2, 4, 6, "exact"), frames[:2])
    with pytest.raises(media.MediaError, match=r"clip.mp4: size 4 x 6 \(H x W\), need 8 x 6"):
        media.fit_frames(frames, 3, 8, 6, "exact", source="clip.mp4")
    with pytest.raises(media.MediaError, match="3 frames, need 5"):
        media.fit_frames(frames, 5, 4, 6)


def test_contact_sheet_places_every_image_in_its_cell():
    h, w, pad = 6, 10, 4
    rows = {
        "student 1-step": [random_frames(1, h, w, s)[0] for s in range(3)],
        "teacher": [random_frames(1, h, w, 10 + s)[0] for s in range(3)],
    }
    sheet = media.contact_sheet(rows, ["a", "b", "c"], pad=pad)
    H, W, _ = sheet.shape
    for r, row in enumerate(reversed(list(rows.values()))):
        for c, img in enumerate(reversed(row)):
            y, x = H - (r + 1) * (h + pad), W - (c + 1) * (w + pad)
            assert torch.equal(sheet[y : y + h, x : x + w], img)
    with pytest.raises(ValueError, match="one common size|uint8"):
        media.contact_sheet({"a": [rows["teacher"][0], random_frames(1, h + 1, w)[0]]})
    with pytest.raises(ValueError, match="at least one image"):
        media.contact_sheet({})
