"""Paste-back on the GPU: generated 256x256 faces into the avatar's frames, then RGB -> I420.

The CPU reference (MuseTalk v1.5's `get_image_blending`, our `avatars.blend.paste_back`):
the face is resized to the face box with bilinear interpolation (cv2 INTER_LINEAR), pasted
into the square crop around it, and the crop is blended into the frame with the blurred
mask. Outside the face box the crop *is* the frame, so the blend leaves it unchanged; the
whole operation therefore reduces to, inside the face box only:

    out = round((resize(face) * m + frame * (255 - m)) / 255)

with `m` the mask at that pixel. Per avatar we keep on the GPU: the frames, for each frame
a fixed-size *region* (the largest face box of the avatar) that holds its face box and
lies inside the frame, and the mask cut to that region (zero outside the face box). A
batch then runs as a handful of batched kernels: one `grid_sample` for every resize, one
gather, one blend, one scatter, whatever the boxes' sizes. No PIL/numpy on the hot path.

I420 output (what the video tracks send) is made the same way: each avatar frame's I420
picture is computed once, at upload, and a generated frame is that picture with only the
region converted again. Regions start on even rows and columns (where the frame's size is
even), so they cover whole 2x2 chroma blocks and every Y, U and V sample outside them is the
avatar frame's own: the result is bit-identical to converting the whole pasted frame
(`rgb_to_i420(paste_back(...))`), for about a tenth of the memory traffic (720p: the RGB
frame copy and a float32 conversion of all 921,600 pixels per frame are gone).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from avatars.avatar import Avatar

log = logging.getLogger(__name__)

FACE_SIZE = 256


@dataclass(frozen=True)
class GpuAvatar:
    """An avatar's paste-back data, resident on one device.

    size     (H, W) of the frames
    origin   (N, 2) int64: top-left (y0, x0) of each frame's region in the frame
    box      (N, 4) float32: face box inside the region: (dy, dx, h, w)
    masks    (N, Rh, Rw) uint8: blend weight of the face inside the region (0 outside the box)
    regions  (N, Rh, Rw, 3) uint8: the frame's pixels under its region
    frames   (N, H, W, 3) uint8, for RGB output and frames of an odd size; else None
    i420     (N, i420_size) uint8: each frame as I420, for frames whose size is even (regions
             are then chroma-aligned, see the module notes); None otherwise
    """

    avatar_id: str
    size: tuple[int, int]
    origin: torch.Tensor
    box: torch.Tensor
    masks: torch.Tensor
    region: tuple[int, int]
    regions: torch.Tensor
    frames: torch.Tensor | None = None
    i420: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.origin.device

    @property
    def nbytes(self) -> int:
        parts = (self.frames, self.origin, self.box, self.masks, self.regions, self.i420)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def chroma_aligned(height: int, width: int) -> bool:
    """Whether regions can cover whole 2x2 chroma blocks (even frame size): the I420 output
    is then made from the region alone."""
    return height % 2 == 0 and width % 2 == 0


def _region_size(avatar: Avatar) -> tuple[int, int]:
    """The largest face box; where the frame's size is even, one more row and column rounded
    up to even (a box starting on an odd row still fits in a region starting on the even row
    above it), within the frame."""
    faces = avatar.face_boxes[avatar.has_face]
    if faces.size == 0:
        return 1, 1
    h = max(int((faces[:, 3] - faces[:, 1]).max()), 1)
    w = max(int((faces[:, 2] - faces[:, 0]).max()), 1)
    height, width = avatar.size
    if chroma_aligned(height, width):
        h, w = min(h + 2 - h % 2, height), min(w + 2 - w % 2, width)
    return h, w


def region_masks(avatar: Avatar) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """CPU pre-computation (once per avatar): origins, boxes in the region, region masks.
    Where the frame's size is even, every origin is even (see `_region_size`)."""
    n = avatar.n_frames
    height, width = avatar.size
    rh, rw = _region_size(avatar)
    align = 2 if chroma_aligned(height, width) else 1
    origin = np.zeros((n, 2), np.int64)
    box = np.zeros((n, 4), np.float32)
    box[:, 2:] = 1.0  # harmless size for frames with no face (their mask is all zero)
    masks = np.zeros((n, rh, rw), np.uint8)
    for i in np.flatnonzero(avatar.has_face):
        x1, y1, x2, y2 = (int(v) for v in avatar.face_boxes[i])
        xs, ys, _, _ = (int(v) for v in avatar.crop_boxes[i])
        h, w = y2 - y1, x2 - x1
        if h <= 0 or w <= 0:
            continue
        y0 = min(y1 - y1 % align, height - rh)  # height - rh is even where align is 2
        x0 = min(x1 - x1 % align, width - rw)
        origin[i] = (y0, x0)
        box[i] = (y1 - y0, x1 - x0, h, w)
        mask = avatar.masks[i]
        cut = mask[max(y1 - ys, 0) : y2 - ys, max(x1 - xs, 0) : x2 - xs]
        ch, cw = min(cut.shape[0], h), min(cut.shape[1], w)
        masks[i, y1 - y0 : y1 - y0 + ch, x1 - x0 : x1 - x0 + cw] = cut[:ch, :cw]
    return origin, box, masks, (rh, rw)


def _resident(a: np.ndarray, dev: torch.device) -> torch.Tensor:
    """A copy of `a` on `dev`, never a view of it: an avatar's frames may be a read-only
    memory map of its file (torch warns about wrapping one; nothing writes through the
    wrapper, which lives only until the copy is made)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        host = torch.from_numpy(np.ascontiguousarray(a))
    return host.to(dev, copy=True)


def upload_avatar(
    avatar: Avatar, device: torch.device | str, keep_frames: bool = True
) -> GpuAvatar:
    """Make the avatar's paste-back data resident on `device`. `keep_frames=False` (I420
    output only, as the server sends it) keeps the frames as I420 and the regions' pixels
    alone, not the RGB frames: a 720p frame then takes 1.5 MiB instead of 4 (frames of an
    odd size keep their RGB frames: their I420 is converted whole)."""
    origin, box, masks, region = region_masks(avatar)
    dev = torch.device(device)
    aligned = chroma_aligned(*avatar.size)
    keep = keep_frames or not aligned
    rh, rw = region
    kept, i420, regions = [], [], []
    for k in range(0, avatar.n_frames, 8):  # in slices: the temporaries stay small
        part = _resident(avatar.frames[k : k + 8], dev)
        if keep:
            kept.append(part)
        if aligned:
            i420.append(rgb_to_i420(part))
        for j, (y0, x0) in enumerate(origin[k : k + 8]):
            regions.append(part[j, y0 : y0 + rh, x0 : x0 + rw])
    height, width = avatar.size
    gav = GpuAvatar(
        avatar_id=avatar.id,
        size=(int(height), int(width)),
        origin=_resident(origin, dev),
        box=_resident(box, dev),
        masks=_resident(masks, dev),
        region=region,
        regions=torch.stack(regions)
        if regions
        else torch.zeros((0, rh, rw, 3), dtype=torch.uint8, device=dev),
        frames=torch.cat(kept) if kept else None,
        i420=torch.cat(i420) if i420 else None,
    )
    log.info(
        "avatar resident on %s: id=%s frames=%d region=%s bytes=%d",
        dev,
        avatar.id,
        avatar.n_frames,
        region,
        gav.nbytes,
    )
    return gav


def faces_to_uint8(faces: torch.Tensor) -> torch.Tensor:
    """VAE output (B, 3, 256, 256) in [0, 1] -> uint8, rounded as MuseTalk does."""
    return (faces.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _region_pixels(
    gav: GpuAvatar, frame_idx: torch.Tensor, rows: int, cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch row, the (rows, cols) window at the row's region origin: its pixels' row
    and column in the frame, (B, rows) and (B, cols)."""
    dev = gav.device
    origin = gav.origin.index_select(0, frame_idx)
    ys = origin[:, 0:1] + torch.arange(rows, device=dev)[None, :]
    xs = origin[:, 1:2] + torch.arange(cols, device=dev)[None, :]
    return ys, xs


def blend_region(
    gav: GpuAvatar,
    frame_idx: torch.Tensor,
    faces: torch.Tensor,
    pixels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pasted pixels of each frame's region: (blended (B, Rh * Rw, 3) uint8, their
    linear index in the frame (B, Rh * Rw) int64). `faces` (B, 3, 256, 256) uint8 or float
    in [0, 1]; `frame_idx` (B,) long on the avatar's device; `pixels`: the regions'
    `_region_pixels`, where the caller has them already."""
    if faces.dtype != torch.uint8:
        faces = faces_to_uint8(faces)
    b = int(frame_idx.shape[0])
    width = gav.size[1]
    rh, rw = gav.region
    dev = gav.device
    box = gav.box.index_select(0, frame_idx)  # (B, 4) dy, dx, h, w
    mask = gav.masks.index_select(0, frame_idx).float()  # (B, Rh, Rw)

    # Bilinear resize 256 -> (h, w) with half-pixel centres (cv2 INTER_LINEAR), via one
    # grid_sample: region pixel (ry, rx) reads face pixel ((ry - dy) + 0.5) * 256 / h - 0.5.
    ry = torch.arange(rh, device=dev, dtype=torch.float32)
    rx = torch.arange(rw, device=dev, dtype=torch.float32)
    gy = (ry[None, :] - box[:, 0:1] + 0.5) * 2.0 / box[:, 2:3] - 1.0  # (B, Rh)
    gx = (rx[None, :] - box[:, 1:2] + 0.5) * 2.0 / box[:, 3:4] - 1.0  # (B, Rw)
    grid = torch.stack((gx[:, None, :].expand(b, rh, rw), gy[:, :, None].expand(b, rh, rw)), dim=-1)
    resized = F.grid_sample(
        faces.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    ).round_()  # (B, 3, Rh, Rw), uint8 values as cv2.resize gives
    resized = resized.permute(0, 2, 3, 1).reshape(b, rh * rw, 3)

    # Blend over the frame's pixels under each region (regions lie inside the frame, so
    # their pixels are distinct and a scatter back has no collisions).
    ys, xs = pixels if pixels is not None else _region_pixels(gav, frame_idx, rh, rw)
    lin = (ys[:, :, None] * width + xs[:, None, :]).reshape(b, rh * rw)
    body = gav.regions.index_select(0, frame_idx).view(b, rh * rw, 3).float()
    m = mask.reshape(b, rh * rw, 1)
    blended = ((resized * m + body * (255.0 - m)) / 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return blended, lin


def paste_back(gav: GpuAvatar, frame_idx: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Frames (B, H, W, 3) uint8 on the device: avatar frames `frame_idx` (B,) with the
    generated faces (B, 3, 256, 256), uint8 or float in [0, 1], blended in."""
    if gav.frames is None:
        raise ValueError(
            f"avatar {gav.avatar_id} is resident for I420 output only (keep_frames=False): "
            "no RGB frames to paste into"
        )
    frame_idx = frame_idx.to(gav.device, torch.long)
    b = int(frame_idx.shape[0])
    height, width = gav.size
    out = gav.frames.index_select(0, frame_idx)  # (B, H, W, 3), a fresh copy
    if b == 0:
        return out
    blended, lin = blend_region(gav, frame_idx, faces)
    out.view(b, height * width, 3).scatter_(1, lin[:, :, None].expand(-1, -1, 3), blended)
    return out


def paste_i420(gav: GpuAvatar, frame_idx: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """`rgb_to_i420(paste_back(...))`, bit for bit, from the avatar's I420 frames with only
    each region converted (needs `gav.i420`: an even frame size). (B, i420_size) uint8."""
    if gav.i420 is None:
        raise ValueError("paste_i420 needs the avatar's I420 frames (an even frame size)")
    frame_idx = frame_idx.to(gav.device, torch.long)
    b = int(frame_idx.shape[0])
    out = gav.i420.index_select(0, frame_idx)  # (B, i420_size), a fresh copy
    if b == 0:
        return out
    height, width = gav.size
    rh, rw = gav.region
    ys, xs = _region_pixels(gav, frame_idx, rh, rw)
    # a pixel's index in the frame is also its Y sample's offset in the I420 buffer
    blended, y_at = blend_region(gav, frame_idx, faces, (ys, xs))
    x = blended.view(b, rh, rw, 3).float()
    y, u, v = _yuv(x[..., 0], x[..., 1], x[..., 2], x[:, ::2, ::2])
    cw, n_y = width // 2, height * width
    n_c = (height // 2) * cw
    c_at = ((ys[:, ::2, None] // 2) * cw + xs[:, None, ::2] // 2).reshape(b, -1)
    at = torch.cat((y_at, n_y + c_at, n_y + n_c + c_at), dim=1)
    values = torch.cat((y.reshape(b, -1), u.reshape(b, -1), v.reshape(b, -1)), dim=1)
    out.scatter_(1, at, values.to(torch.uint8))
    return out


def paste_flat(
    gav: GpuAvatar, frame_idx: torch.Tensor, faces: torch.Tensor, i420: bool = True
) -> torch.Tensor:
    """The pipeline's paste stage: `paste_back`, then each frame flat (B, bytes): I420
    (`rgb_to_i420`) or RGB."""
    if i420 and gav.i420 is not None:
        return paste_i420(gav, frame_idx, faces)
    pictures = paste_back(gav, frame_idx, faces)
    return rgb_to_i420(pictures) if i420 else pictures.reshape(pictures.shape[0], -1)


def i420_size(height: int, width: int) -> int:
    """Bytes of one I420 frame: Y plane, then U and V at half resolution (rounded up)."""
    return height * width + 2 * ((height + 1) // 2) * ((width + 1) // 2)


def rgb_to_i420(frames: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 RGB -> (B, i420_size) uint8: BT.601 limited range, chroma taken
    at the top-left pixel of each 2x2 block, as `cv2.cvtColor(.., COLOR_RGB2YUV_I420)`
    (within 1 level of it), so the GPU and CPU paths send the same pictures."""
    b = frames.shape[0]
    x = frames.float()  # (B, H, W, 3)
    y, u, v = _yuv(x[..., 0], x[..., 1], x[..., 2], x[:, ::2, ::2])
    out = torch.cat((y.reshape(b, -1), u.reshape(b, -1), v.reshape(b, -1)), dim=1)
    return out.to(torch.uint8)


def _yuv(
    r: torch.Tensor, g: torch.Tensor, b: torch.Tensor, chroma_rgb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BT.601 limited range, as float32 levels: Y of every pixel (`r`, `g`, `b`), U and V of
    `chroma_rgb` (..., 3): each 2x2 block's top-left pixel. One formula for the whole-frame
    conversion and the region's, so the two agree bit for bit."""
    y = (16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0).round_().clamp_(0, 255)
    r, g, b = chroma_rgb[..., 0], chroma_rgb[..., 1], chroma_rgb[..., 2]
    u = (128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0).round_().clamp_(0, 255)
    v = (128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0).round_().clamp_(0, 255)
    return y, u, v


def i420_planes(buf: np.ndarray | torch.Tensor, height: int, width: int) -> tuple:
    """Views of one frame's I420 buffer as its (Y, U, V) planes, each contiguous."""
    ch, cw = (height + 1) // 2, (width + 1) // 2
    n = height * width
    return (
        buf[:n].reshape(height, width),
        buf[n : n + ch * cw].reshape(ch, cw),
        buf[n + ch * cw : n + 2 * ch * cw].reshape(ch, cw),
    )
