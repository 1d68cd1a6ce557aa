"""MuseTalk v1.5's face box and jaw mask, against reference implementations of MuseTalk's own
code (`get_landmark_and_bbox`, `realtime_inference.py`'s extra margin, `FaceParsing` in "jaw"
mode, `get_image_prepare_material`) written here, on fixed landmarks and parsing maps; and the
face pipeline on the astronaut through both paths (musetalk with tiny random weights, fallback)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

cv2 = pytest.importorskip("cv2")

from avatars.boxes import crop_box  # noqa: E402
from avatars.musetalk_faces.boxes import (  # noqa: E402
    NO_FACE,
    adjust_range,
    face_boxes,
    landmark_box,
)
from avatars.musetalk_faces.jaw_mask import (  # noqa: E402
    blend_mask_from_parsing,
    cone_kernel,
    jaw_region,
)

# ---- reference: MuseTalk's code, as it is ----------------------------------------------------


def ref_box(keypoints: np.ndarray, detection: tuple[int, int, int, int] | None, shift: int):
    """`get_landmark_and_bbox` for one frame (MuseTalk's lines, without the models)."""
    if detection is None:
        return None
    face_land_mark = keypoints.astype(np.int32)
    half_face_coord = face_land_mark[29]
    if shift != 0:
        half_face_coord[1] = shift + half_face_coord[1]
    half_face_dist = np.max(face_land_mark[:, 1]) - half_face_coord[1]
    upper_bond = max(0, half_face_coord[1] - half_face_dist)
    f_landmark = (
        np.min(face_land_mark[:, 0]),
        int(upper_bond),
        np.max(face_land_mark[:, 0]),
        np.max(face_land_mark[:, 1]),
    )
    x1, y1, x2, y2 = f_landmark
    if y2 - y1 <= 0 or x2 - x1 <= 0 or x1 < 0:
        return detection
    return f_landmark


def ref_v15(box, height: int, extra_margin: int = 10):
    x1, y1, x2, y2 = box
    return [int(x1), int(y1), int(x2), int(min(y2 + extra_margin, height))]


def ref_range(keypoints: list[np.ndarray]) -> tuple[int, int]:
    minus, plus = [], []
    for k in keypoints:
        lm = k.astype(np.int32)
        minus.append((lm[30] - lm[29])[1])
        plus.append((lm[29] - lm[28])[1])
    return -int(sum(minus) / len(minus)), int(sum(plus) / len(plus))


def ref_kernel() -> np.ndarray:
    cone_height, tail_height = 21, 12
    total = cone_height + tail_height
    kernel = np.zeros((total, total), dtype=np.uint8)
    cx = total // 2
    for row in range(cone_height):
        if row < cone_height // 2:
            continue
        width = int(2 * (row - cone_height // 2) + 1)
        kernel[row, int(cx - width // 2) : int(cx + width // 2 + 1)] = 1
    base = int(kernel[cone_height - 1].sum())
    for row in range(cone_height, total):
        kernel[row, max(0, cx - base // 2) : min(total, cx + base // 2 + 1)] = 1
    return kernel


def ref_jaw(parsing: np.ndarray, cheek: int = 90) -> np.ndarray:
    parsing = parsing.astype(np.int64).copy()
    cheek_mask = np.zeros((512, 512), dtype=np.uint8)
    cv2.rectangle(cheek_mask, (0, 0), (256 - cheek, 512), 255, -1)
    cv2.rectangle(cheek_mask, (256 + cheek, 0), (512, 512), 255, -1)
    cheek_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))
    face_region = (np.isin(parsing, [1]) * 255).astype(np.uint8)
    dilated = cv2.dilate(face_region, ref_kernel(), iterations=1)
    eroded = cv2.erode(dilated, cheek_kernel, iterations=2)
    face_region = cv2.bitwise_and(eroded, cheek_mask)
    face_region = cv2.bitwise_or(face_region, cv2.bitwise_and(dilated, ~cheek_mask))
    parsing[(face_region == 255) & (~np.isin(parsing, [10]))] = 255
    parsing[np.isin(parsing, [11, 12, 13])] = 255
    parsing[np.where(parsing != 255)] = 0
    return parsing.astype(np.uint8)


def ref_prepare_material(parsing: np.ndarray, face_box, frame_shape) -> tuple[np.ndarray, list]:
    """`get_image_prepare_material` with `face_seg` (PIL resize to the crop's size)."""
    x, y, x1, y1 = face_box
    xc, yc = (x + x1) // 2, (y + y1) // 2
    s = int(max(x1 - x, y1 - y) // 2 * 1.5)
    x_s, y_s, x_e, y_e = xc - s, yc - s, xc + s, yc + s
    ori_shape = (x_e - x_s, y_e - y_s)
    mask_image = Image.fromarray(ref_jaw(parsing)).resize(ori_shape)
    mask_small = mask_image.crop((x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    mask_image = Image.new("L", ori_shape, 0)
    mask_image.paste(mask_small, (x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    width, height = mask_image.size
    top = int(height * 0.5)
    modified = Image.new("L", ori_shape, 0)
    modified.paste(mask_image.crop((0, top, width, height)), (0, top))
    k = int(0.1 * ori_shape[0] // 2 * 2) + 1
    return cv2.GaussianBlur(np.array(modified), (k, k), 0), [x_s, y_s, x_e, y_e]


# ---- fixed inputs ---------------------------------------------------------------------------


def face_keypoints(cx: float, cy: float, scale: float, rng: np.random.Generator) -> np.ndarray:
    """68 plausible face points (jaw 0-16, brows, nose 27-35, eyes, mouth) around (cx, cy)."""
    pts = np.zeros((68, 2))
    t = np.linspace(-1.0, 1.0, 17)
    pts[0:17] = np.stack([cx + scale * t, cy + scale * (0.2 + 0.8 * (1 - t**2) ** 0.5)], 1)
    pts[17:27] = np.stack(
        [cx + scale * np.linspace(-0.8, 0.8, 10), np.full(10, cy - 0.55 * scale)], 1
    )
    pts[27:31] = np.stack([np.full(4, cx), cy - scale * np.array([0.4, 0.25, 0.1, -0.05])], 1)
    pts[31:36] = np.stack([cx + scale * np.linspace(-0.2, 0.2, 5), np.full(5, cy + 0.1 * scale)], 1)
    pts[36:48] = np.stack(
        [
            cx + scale * np.tile(np.linspace(-0.6, -0.2, 6), 2) * np.repeat([1, -1], 6),
            np.full(12, cy - 0.35 * scale),
        ],
        1,
    )
    pts[48:68] = np.stack(
        [
            cx + scale * 0.35 * np.cos(np.linspace(0, 2 * np.pi, 20)),
            cy + scale * (0.45 + 0.1 * np.sin(np.linspace(0, 2 * np.pi, 20))),
        ],
        1,
    )
    return pts + rng.uniform(-0.9, 0.9, pts.shape)


FRAME_SHAPE = (480, 640, 3)


def fixed_frames():
    rng = np.random.default_rng(7)
    kps, dets = [], []
    for i in range(6):
        kps.append(face_keypoints(300 + 7 * i, 200 + 3 * i, 90 + 2 * i, rng))
        dets.append(np.array([[210.7 + i, 95.2, 395.9, 330.4 + i, 0.99], [5, 5, 20, 20, 0.6]]))
    kps.append(face_keypoints(320, 240, 80, rng))  # 6: no detection -> no face
    dets.append(np.zeros((0, 5)))
    bad = face_keypoints(20, 300, 60, rng)  # 7: landmarks left of the frame -> S3FD box
    dets.append(np.array([[-4.2, 230.9, 88.1, 410.6, 0.9]]))
    kps.append(bad)
    low = face_keypoints(320, 420, 80, rng)  # 8: box reaching below the frame: margin capped
    dets.append(np.array([[250.0, 330.0, 400.0, 479.0, 0.95]]))
    kps.append(low)
    return np.stack(kps).astype(np.float32), dets


def ref_detection(dets: np.ndarray):
    if len(dets) == 0:
        return None
    d = np.clip(dets[0], 0, None)
    return tuple(int(v) for v in d[:-1])


# ---- boxes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0, 10, -10, 3, -7, 200, -200])
def test_boxes_equal_musetalk(shift: int) -> None:
    kps, dets = fixed_frames()
    got = face_boxes(kps, dets, shift, FRAME_SHAPE)
    for i in range(len(dets)):
        want = ref_box(kps[i].copy(), ref_detection(dets[i]), shift)
        if want is None:
            assert tuple(got.face_boxes[i]) == NO_FACE and got.sources[i] == "none"
        else:
            assert got.face_boxes[i].tolist() == ref_v15(want, FRAME_SHAPE[0]), (i, shift)
    assert got.sources[6] == "none" and got.sources[7] == "detector"
    assert got.face_boxes[8][3] == FRAME_SHAPE[0]  # y2 + 10 capped at the frame height
    if shift == 200:  # the nose point pushed below every landmark: MuseTalk falls back
        assert got.count("detector") == 8


def test_bbox_shift_moves_the_top_by_twice_the_shift() -> None:
    kps, _ = fixed_frames()
    base = landmark_box(kps[0], 0)
    for shift in (10, -10):
        moved = landmark_box(kps[0], shift)
        assert base is not None and moved is not None
        assert moved[1] - base[1] == 2 * shift
        assert (moved[0], moved[2], moved[3]) == (base[0], base[2], base[3])


def test_adjust_range_equals_musetalk() -> None:
    kps, dets = fixed_frames()
    got = face_boxes(kps, dets, 0, FRAME_SHAPE)
    with_face = [kps[i] for i in range(len(dets)) if len(dets[i])]
    assert got.adjust_range == ref_range(with_face)
    assert got.adjust_range[0] < 0 < got.adjust_range[1]
    assert adjust_range(kps, np.zeros(len(kps), dtype=bool)) is None


# ---- masks ----------------------------------------------------------------------------------


def fixed_parsing(seed: int) -> np.ndarray:
    """A face-like class map: skin ellipse, nose, lips, mouth, hair, eyes, noise at the edges."""
    rng = np.random.default_rng(seed)
    p = np.zeros((512, 512), dtype=np.uint8)
    cv2.ellipse(p, (256 + seed, 250), (150, 190), 0, 0, 360, 1, -1)
    cv2.ellipse(p, (256, 90), (170, 80), 0, 180, 360, 17, -1)
    cv2.ellipse(p, (256, 270), (28, 60), 0, 0, 360, 10, -1)
    cv2.ellipse(p, (256, 370), (70, 22), 0, 0, 360, 12, -1)
    cv2.ellipse(p, (256, 370), (45, 8), 0, 0, 360, 11, -1)
    cv2.ellipse(p, (256, 392), (60, 10), 0, 0, 360, 13, -1)
    for x in (190, 322):
        cv2.ellipse(p, (x, 200), (30, 12), 0, 0, 360, 4, -1)
    noise = rng.integers(0, 19, size=(512, 512)).astype(np.uint8)
    edge = rng.random((512, 512)) < 0.03
    p[edge] = noise[edge]
    return p


def test_cone_kernel_equals_musetalk() -> None:
    assert np.array_equal(cone_kernel(), ref_kernel())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jaw_region_equals_musetalk(seed: int) -> None:
    p = fixed_parsing(seed)
    got = jaw_region(p)
    assert np.array_equal(got, ref_jaw(p))
    assert got[370, 256] == 255 and got[270, 256] == 0  # lips in, nose out


@pytest.mark.parametrize(
    "box", [(210, 95, 395, 340), (0, 0, 120, 170), (500, 300, 640, 480), (33, 41, 34, 43)]
)
def test_blend_mask_equals_musetalk(box) -> None:
    p = fixed_parsing(1)
    want, want_crop = ref_prepare_material(p, box, FRAME_SHAPE)
    crop = crop_box(box)
    assert list(crop) == want_crop
    got = blend_mask_from_parsing(p, box, crop)
    assert got.shape == want.shape and np.array_equal(got, want)


# ---- the pipeline on the astronaut ---------------------------------------------------------


def astronaut_frames(n: int = 3) -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    face = np.ascontiguousarray(data.astronaut()[:384, 64:448])  # 384 x 384, the face inside
    return np.stack([np.roll(face, 3 * i, axis=1) for i in range(n)])


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Tiny random weights of the real layout in MuseTalk's folders."""
    try:
        from avatars.musetalk_faces.weights import make_random
    except ImportError as exc:
        pytest.skip(f"the face models' weights module is not there yet ({exc})")
    root = tmp_path_factory.mktemp("models")
    make_random(root, "tiny", seed=3)
    return root


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_models):
    from avatars.musetalk_faces.pipeline import FacePipeline, PipelineOptions

    pipeline, reason = FacePipeline.load(tiny_models, "cpu", PipelineOptions(batch=2))
    assert pipeline is not None, reason
    return pipeline


def test_pipeline_missing_weights_says_which_and_how(tmp_path) -> None:
    from avatars.musetalk_faces.pipeline import FacePipeline

    pipeline, reason = FacePipeline.load(tmp_path, "cpu")
    assert pipeline is None
    assert "dw-ll_ucoco_384.pth" in reason and "79999_iter.pth" in reason
    assert "s3fd-619a316812.pth" in reason and "lipstream models download" in reason


def test_pipeline_equals_musetalk_rules_on_the_astronaut(tiny_pipeline) -> None:
    """The pipeline with tiny random models gives the boxes and masks MuseTalk's rules give
    from the same models' outputs (a -10 shift; S3FD's box where the landmarks are unusable)."""
    from avatars.musetalk_faces.bisenet import parse_faces
    from avatars.musetalk_faces.dwpose import face_landmarks
    from avatars.musetalk_faces.s3fd import detect_faces

    pipeline = tiny_pipeline
    assert pipeline.sizes == {"s3fd": "tiny", "dwpose": "tiny", "bisenet": "tiny"}
    frames = astronaut_frames(2)
    seen: list[float] = []
    boxes, masks, info = pipeline.run(frames, -10, lambda f, s: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert set(info["stage_seconds"]) == {"detect", "landmarks", "parse", "masks"}
    from avatars.boxes import crop_region

    all_dets = detect_faces(pipeline.s3fd, frames)
    all_kps = face_landmarks(pipeline.dwpose, frames)
    for i, frame in enumerate(frames):
        want = ref_box(all_kps[i].copy(), ref_detection(all_dets[i]), -10)
        if want is None:  # no face: shown unchanged
            assert tuple(boxes[i]) == NO_FACE and masks[i].shape == (0, 0)
            continue
        x1, y1, x2, y2 = ref_v15(want, frame.shape[0])
        assert boxes[i].tolist() == [x1, y1, min(x2, frame.shape[1]), y2]
        crop = crop_box(boxes[i])
        parsed = parse_faces(pipeline.bisenet, [crop_region(frame, crop)])[0]
        want_mask, _ = ref_prepare_material(parsed, tuple(boxes[i]), frame.shape)
        assert np.array_equal(masks[i], want_mask)
    assert info["frames_without_face"] == int((boxes[:, 0] < 0).sum())


def test_astronaut_registers_through_both_pipelines(tiny_pipeline) -> None:
    from avatars.decode import AvatarInputError
    from avatars.prepare import prepare_avatar

    frames = astronaut_frames(2)
    fallback = prepare_avatar(
        frames, 25.0, name="a", avatar_id="a1", fallback_reason="no weights here"
    )
    assert fallback.meta["face_pipeline"] == "fallback"
    assert fallback.meta["face_pipeline_reason"] == "no weights here"
    assert fallback.has_face.all() and fallback.meta["bbox_shift_range"] is None

    one = frames[:1]
    try:
        avatar = prepare_avatar(one, 25.0, name="a", avatar_id="a2", face_pipeline=tiny_pipeline)
    except AvatarInputError:  # the random detector found nothing: refused, as without a face
        boxes, _, _ = tiny_pipeline.run(one, 0)
        assert (boxes[:, 0] < 0).all()
        return
    assert avatar.meta["face_pipeline"] == "musetalk"
    assert avatar.meta["face_pipeline_reason"] is None
    assert avatar.meta["bbox_shift_range"] == avatar.meta["face_details"]["bbox_shift_range"]
    assert set(avatar.meta["stage_seconds"]) == {"detect", "landmarks", "parse", "masks", "latents"}
    for i in np.flatnonzero(avatar.has_face):
        assert tuple(avatar.crop_boxes[i]) == crop_box(avatar.face_boxes[i])
        assert avatar.masks[i].shape == (
            avatar.crop_boxes[i][3] - avatar.crop_boxes[i][1],
            avatar.crop_boxes[i][2] - avatar.crop_boxes[i][0],
        )


# ---- the fallback, said out loud: avatar add, REST status, server log ----------------------


def astronaut_jpeg(tmp_path) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(astronaut_frames(1)[0], cv2.COLOR_RGB2BGR))
    assert ok
    return bytes(data)


def test_avatar_add_warns_of_the_fallback_and_list_shows_it(tmp_path) -> None:
    from typer.testing import CliRunner

    from lipstream.commands.avatar import avatar_app

    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(astronaut_jpeg(tmp_path))
    dirs = ["--avatars-dir", str(tmp_path / "avatars")]
    added = CliRunner().invoke(
        avatar_app, ["add", "astro", str(photo), *dirs, "--models-dir", str(tmp_path / "none")]
    )
    assert added.exit_code == 0, added.output
    assert "warning: the lips will be less accurate" in added.output
    assert "lipstream models download" in added.output
    assert "faces: fallback" in added.output
    listed = CliRunner().invoke(avatar_app, ["list", *dirs], env={"COLUMNS": "250"})
    header = next(line for line in listed.output.splitlines() if line.startswith("┃"))
    assert " faces " in header and " shift " in header
    assert "fallback" in listed.output and "less accurate lips" in listed.output


def test_avatars_stored_before_read_as_fallback(tmp_path) -> None:
    import json

    from avatars.prepare import prepare_avatar
    from avatars.store import AvatarStore

    store = AvatarStore(tmp_path / "avatars")
    avatar = prepare_avatar(astronaut_frames(1), 25.0, name="old", avatar_id=store.new_id())
    store.save(avatar)
    meta_path = store.path(avatar.id) / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("face_pipeline", "face_pipeline_reason", "bbox_shift_range"):
        meta.pop(key)
        meta["prep"].pop(key)
    meta_path.write_text(json.dumps(meta))
    shown = store.describe(avatar.id)
    assert shown["status"] == "ready"
    assert shown["face_pipeline"] == "fallback"
    assert shown["face_pipeline_reason"] == "registered before face models"
    assert shown["bbox_shift_range"] is None


def test_rest_status_and_server_log_say_the_fallback_once(tmp_path, caplog) -> None:
    import logging
    import time

    import httpx

    from bench.loopback import ServerThread
    from engines.preview import PreviewEngine
    from server.app import create_app
    from server.settings import Settings

    settings = Settings(
        engine="preview", avatars_dir=tmp_path / "avatars", models_dir=tmp_path / "none"
    )
    caplog.set_level(logging.WARNING, logger="server.avatar_service")
    server = ServerThread(create_app(settings, engine=PreviewEngine(), reason="test")).start()
    try:
        base = server.base_url
        r = httpx.post(
            f"{base}/v1/avatars",
            files={"file": ("face.jpg", astronaut_jpeg(tmp_path), "image/jpeg")},
            data={"name": "astro"},
            timeout=30,
        )
        assert r.status_code == 202, r.text
        avatar_id = r.json()["id"]
        deadline = time.monotonic() + 30
        while True:
            info = httpx.get(f"{base}/v1/avatars/{avatar_id}").json()
            if info["status"] in ("ready", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        server.stop()
    assert info["status"] == "ready", info
    assert info["face_pipeline"] == "fallback"
    assert "s3fd-619a316812.pth" in info["face_pipeline_reason"]
    assert "less accurate" in info["warning"] and "lipstream models download" in info["warning"]
    assert info["bbox_shift_range"] is None
    assert {"detect", "masks", "latents"} <= set(info["stage_seconds"])
    said = [r for r in caplog.records if "fallback face pipeline" in r.getMessage()]
    assert len(said) == 1 and said[0].avatar_id == avatar_id


@pytest.mark.gpu
def test_pipeline_runs_batched_on_the_gpu(tiny_models, tiny_pipeline) -> None:
    """On CUDA the same models give the CPU's boxes (within 2 px: float rounding may move a
    truncated landmark) and the same frames without a face."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    from avatars.musetalk_faces.pipeline import FacePipeline, PipelineOptions

    gpu, reason = FacePipeline.load(tiny_models, "cuda", PipelineOptions(batch=4))
    assert gpu is not None, reason
    frames = astronaut_frames(6)
    boxes, masks, info = gpu.run(frames, 0)
    assert info["device"] == "cuda" and set(info["stage_seconds"]) >= {"detect", "parse"}
    cpu_boxes, cpu_masks, _ = tiny_pipeline.run(frames, 0)
    assert np.abs(boxes.astype(int) - cpu_boxes.astype(int)).max() <= 2
    assert [m.size == 0 for m in masks] == [c.size == 0 for c in cpu_masks]


def test_avatar_add_with_the_face_models_uses_musetalks_pipeline(tmp_path, tiny_models) -> None:
    from typer.testing import CliRunner

    from avatars.store import AvatarStore
    from lipstream.commands.avatar import avatar_app

    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(astronaut_jpeg(tmp_path))
    root = tmp_path / "avatars"
    args = ["add", "astro", str(photo), "--avatars-dir", str(root), "--device", "cpu"]
    added = CliRunner().invoke(avatar_app, [*args, "--models-dir", str(tiny_models)])
    if added.exit_code == 1 and "no face found" in added.output:
        pytest.skip("the tiny random S3FD finds no face in this photo")
    assert added.exit_code == 0, added.output
    assert "faces: musetalk" in added.output and "warning" not in added.output
    (meta,) = AvatarStore(root).list()
    assert meta["face_pipeline"] == "musetalk" and meta["face_pipeline_reason"] is None
    low, high = meta["bbox_shift_range"]
    assert f"bbox_shift adjust range [{low} ~ {high}]" in added.output


class _MessageHub:  # stands for the mmengine objects in DWPose's published training checkpoint
    def __init__(self) -> None:
        self.values = [1.0]


def test_pipeline_loads_dwpose_from_a_training_checkpoint(tiny_models, tmp_path) -> None:
    """DWPose's published file holds optimizer state and mmengine objects beside its
    state_dict: the pipeline reads its tensors only, and still loads strictly."""
    import shutil

    import torch

    from avatars.musetalk_faces.pipeline import DWPOSE_WEIGHTS, FacePipeline, PipelineOptions

    root = tmp_path / "models"
    shutil.copytree(tiny_models, root)
    path = root / DWPOSE_WEIGHTS
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    torch.save({"state_dict": state, "message_hub": _MessageHub(), "optimizer": {}}, path)
    with pytest.raises(Exception, match=r"(?i)weights.only|unsupported global"):
        torch.load(path, weights_only=True)
    pipeline, reason = FacePipeline.load(root, "cpu", PipelineOptions(batch=2))
    assert pipeline is not None, reason
    assert pipeline.sizes["dwpose"] == "tiny"
