"""MTCNN face detection (facenet-pytorch; its P/R/O-net weights ship inside the package, so
nothing is downloaded) returning plain float32 numpy arrays.

    det = FaceDetector(device="cpu")
    faces = det.detect([rgb_uint8_hxwx3, ...])   # one Faces per image
    faces[0].boxes [n, 4] (x0, y0, x1, y1), .scores [n], .landmarks [n, 5, 2] (x, y)

Landmark order: left eye, right eye, nose, mouth left, mouth right ("left" = image left).
Faces come sorted by box area, largest first. Images are downscaled so that their longer side
is at most `max_side` before detection (results are mapped back to source pixels), zero-padded
to a multiple of `pad_multiple`, and images of equal padded size are detected in one batch.

MTCNN here is this module's own P-, R- and O-net modules loaded with the weights that ship in
facenet-pytorch's package folder (read as files: neither facenet-pytorch nor torchvision is
imported, which cost an align actor 1.5 s of start-up), and its own implementation of the
three stages with facenet-pytorch's `detect_face` steps: pyramid scales, thresholds, box
generation, regression, squaring, clipping and NMS. Pixels are resampled by Pillow on the 8-bit
image (BOX filter: area averages) instead of torch's area interpolation of a float copy of the
whole image per pyramid level and per candidate, and on a CPU P-net takes one image at a time in
channels-last memory: about half the CPU time of `detect_face`, for boxes and points within
~1 px of its own (measured on 512 x 512 to 1024 x 768 photos).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from stmodel.device import resolve_device


@dataclass
class Faces:
    boxes: np.ndarray      # [n, 4] float32
    scores: np.ndarray     # [n] float32
    landmarks: np.ndarray  # [n, 5, 2] float32

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def empty() -> "Faces":
        return Faces(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))


def facenet_weights(name: str) -> str:
    """Path of one of facenet-pytorch's MTCNN weight files (pnet.pt, rnet.pt, onet.pt), found
    without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("facenet-pytorch is not installed: its package holds the MTCNN weights")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", f"{name}.pt")


class PNet(nn.Module):
    """MTCNN's proposal net (fully convolutional: 12 x 12 windows, stride 2). Parameter names
    are the keys of facenet-pytorch's pnet.pt. Returns (box regression [N, 4, h, w], face
    probability [N, 2, h, w])."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


def _flatten_whc(x: torch.Tensor) -> torch.Tensor:
    # The dense layers' weights were trained on features flattened in (W, H, C) order.
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class RNet(nn.Module):
    """MTCNN's refinement net on 24 x 24 crops: (box regression [N, 4], probability [N, 2])."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu4(self.dense4(_flatten_whc(self.prelu3(self.conv3(x)))))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    """MTCNN's output net on 48 x 48 crops: (box regression [N, 4], 5 points [N, 10] as x1..x5,
    y1..y5 in box units, probability [N, 2])."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu5(self.dense5(_flatten_whc(self.prelu4(self.conv4(x)))))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def _load_net(net: nn.Module, name: str) -> nn.Module:
    state = torch.load(facenet_weights(name), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


class FaceDetector:
    def __init__(self, device: str | torch.device | None = "auto", min_face_size: int = 20,
                 thresholds=(0.6, 0.7, 0.7), factor: float = 0.709, max_side: int | None = 1024,
                 pad_multiple: int = 32, max_batch: int = 16):
        self.device = resolve_device(device)
        self.min_face_size, self.thresholds, self.factor = float(min_face_size), tuple(thresholds), float(factor)
        # P-net's convs run ~1.5x faster in channels-last memory on a CPU.
        self.pnet = _load_net(PNet(), "pnet").to(self.device).to(memory_format=torch.channels_last)
        self.rnet = _load_net(RNet(), "rnet").to(self.device)
        self.onet = _load_net(ONet(), "onet").to(self.device)
        self.max_side = int(max_side) if max_side else None
        self.pad_multiple = max(1, int(pad_multiple))
        self.max_batch = max(1, int(max_batch))

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        h, w = image.shape[:2]
        scale = 1.0
        if self.max_side and max(h, w) > self.max_side:
            f = -(-max(h, w) // self.max_side)
            if max(h, w) / f >= 0.9 * self.max_side:
                # An integer factor that lands within 10 % of max_side: a plain f x f average
                # (e.g. 2000 -> 1000), several times cheaper than a filtered resize.
                image = np.asarray(Image.fromarray(image).reduce(f))
                scale = 1.0 / f
            else:
                scale = self.max_side / float(max(h, w))
                nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
                image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR,
                                                                 reducing_gap=2.0))
                scale = nw / float(w)  # the exact factor actually applied along x (y agrees to < 1 px)
        m = self.pad_multiple
        ph, pw = -image.shape[0] % m, -image.shape[1] % m
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        return image, scale

    @torch.inference_mode()
    def _run(self, stack: np.ndarray, min_face: float | None = None):
        """MTCNN's three stages on a batch of equal-sized RGB uint8 images [N, H, W, 3]: per
        image, boxes [k, 5] (x0, y0, x1, y1, score) and points [k, 5, 2] in its pixels."""
        n, h, w = stack.shape[:3]
        pils = [Image.fromarray(a, "RGB") for a in stack]
        t1, t2, t3 = self.thresholds
        scale = 12.0 / float(min_face or self.min_face_size)
        minl = min(h, w) * scale
        found = []  # per level and image: [x0, y0, x1, y1, score, 4 x regression, image index]
        level = pils
        while minl >= 12:
            size = (int(w * scale + 1), int(h * scale + 1))
            # Each level from the previous, larger one (a 1.4x box reduction): the same area
            # average to within rounding, for a fraction of the work of resampling the original.
            level = [p.resize(size, Image.Resampling.BOX) for p in level]
            # On a CPU, P-net takes one image at a time: its activations then stay in cache
            # (8 images of 1024 x 768 in one call took 2.5x longer than one by one).
            step = n if self.device.type != "cpu" else 1
            for k in range(0, n, step):
                reg, prob = self.pnet(_net_input(level[k:k + step], self.device))
                b = _proposals(reg.float().cpu().numpy(), prob[:, 1].float().cpu().numpy(), scale, t1, k)
                found.append(b[_nms(b, 0.5)])
            scale *= self.factor
            minl *= self.factor
        boxes = np.concatenate(found) if found else np.zeros((0, 10), np.float32)
        boxes = boxes[_nms(boxes, 0.7)]
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = np.stack([boxes[:, 0] + boxes[:, 5] * bw, boxes[:, 1] + boxes[:, 6] * bh,
                          boxes[:, 2] + boxes[:, 7] * bw, boxes[:, 3] + boxes[:, 8] * bh,
                          boxes[:, 4], boxes[:, 9]], axis=1)
        boxes = _square(boxes)

        # R-net on 24 x 24 crops of the candidates, then O-net on 48 x 48 crops of the survivors.
        points = np.zeros((0, 5, 2), np.float32)
        boxes, x = _crops(pils, boxes, 24, w, h, self.device)
        if len(boxes):
            reg, prob = (v.float().cpu().numpy() for v in self.rnet(x))
            keep = prob[:, 1] > t2
            boxes, reg = boxes[keep].copy(), reg[keep]
            boxes[:, 4] = prob[keep, 1]
            pick = _nms(boxes, 0.7)
            boxes = _square(_regress(boxes[pick], reg[pick]))
            boxes, x = _crops(pils, boxes, 48, w, h, self.device)
        if len(boxes):
            reg, pts, prob = (v.float().cpu().numpy() for v in self.onet(x))
            keep = prob[:, 1] > t3
            boxes, reg, pts = boxes[keep].copy(), reg[keep], pts[keep]
            boxes[:, 4] = prob[keep, 1]
            bw = boxes[:, 2:3] - boxes[:, 0:1] + 1
            bh = boxes[:, 3:4] - boxes[:, 1:2] + 1
            points = np.stack([bw * pts[:, :5] + boxes[:, 0:1] - 1, bh * pts[:, 5:10] + boxes[:, 1:2] - 1], axis=2)
            boxes = _regress(boxes, reg)
            pick = _nms(boxes, 0.7, by_min=True)
            boxes, points = boxes[pick], points[pick]
        inds = boxes[:, 5].astype(np.int64) if len(boxes) else np.zeros(0, np.int64)
        return ([boxes[inds == k, :5].astype(np.float32) for k in range(n)],
                [points[inds == k].astype(np.float32) for k in range(n)])

    def detect(self, images: list[np.ndarray], min_face: int | None = None) -> list[Faces]:
        """Detect faces in RGB uint8 images [H, W, 3] (any sizes). Never mixes images up."""
        prepared = [self._prepare(np.ascontiguousarray(im[..., :3], dtype=np.uint8)) for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (im, _) in enumerate(prepared):
            groups.setdefault(im.shape[:2], []).append(i)
        out: list[Faces] = [Faces.empty() for _ in images]
        for idx in groups.values():
            for s in range(0, len(idx), self.max_batch):
                chunk = idx[s:s + self.max_batch]
                stack = np.stack([prepared[i][0] for i in chunk])
                batch_boxes, batch_points = self._run(stack, min_face)
                for j, i in enumerate(chunk):
                    out[i] = self._to_faces(batch_boxes[j], batch_points[j], prepared[i][1], images[i].shape[:2])
        return out

    @staticmethod
    def _to_faces(boxes, points, scale: float, hw) -> Faces:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
        p = np.asarray(points, dtype=np.float64).reshape(-1, 5, 2)
        if b.shape[0] == 0:
            return Faces.empty()
        # Pixel centres: pixel u of the copy averages source pixels around (u + 0.5) / scale - 0.5.
        off = 0.5 / scale - 0.5
        boxes4, scores = b[:, :4] / scale + off, b[:, 4]
        lms = p / scale + off
        # Faces found only in the zero padding are impossible to align: drop them.
        h, w = hw
        cx, cy = (boxes4[:, 0] + boxes4[:, 2]) / 2, (boxes4[:, 1] + boxes4[:, 3]) / 2
        keep = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h) & np.isfinite(lms).all(axis=(1, 2))
        boxes4, scores, lms = boxes4[keep], scores[keep], lms[keep]
        area = (boxes4[:, 2] - boxes4[:, 0]) * (boxes4[:, 3] - boxes4[:, 1])
        order = np.argsort(-area, kind="stable")
        return Faces(boxes4[order].astype(np.float32), scores[order].astype(np.float32),
                     lms[order].astype(np.float32))

    def refine(self, images: list[np.ndarray], landmarks: list[np.ndarray], passes: int = 1,
               size: int = 256, max_shift: float = 0.1) -> list[np.ndarray]:
        """Re-detect the landmarks on each face's first FFHQ crop and map them back.

        MTCNN is most accurate on upright faces of a known scale: one pass cuts the alignment
        quad's error on rotated / rescaled / shifted photos by about 3x (see tests/test_align.py).
        `landmarks[i]` is [n_i, 5, 2] for image i; returns arrays of the same shapes. A face whose
        re-detection fails, or lands farther than `max_shift` * size from where it was, keeps
        its previous landmarks."""
        from stmodel.align import crop_from_quad, crop_to_source, ffhq_quad, source_to_crop

        out = [np.asarray(lm, dtype=np.float64).reshape(-1, 5, 2).copy() for lm in landmarks]
        for _ in range(max(0, int(passes))):
            jobs, crops, quads = [], [], []
            for i, lms in enumerate(out):
                for k, lm in enumerate(lms):
                    try:
                        q, _ = ffhq_quad(lm)
                        crops.append(crop_from_quad(images[i], q, size=size, supersample=1))
                    except Exception:  # noqa: BLE001 - keep the first-pass landmarks
                        continue
                    jobs.append((i, k))
                    quads.append(q)
            if not jobs:
                break
            found = self.detect(crops, min_face=max(20, size // 5))
            for (i, k), q, faces in zip(jobs, quads, found):
                if len(faces) == 0:
                    continue
                expected = source_to_crop(out[i][k], q, size)
                dist = np.abs(faces.landmarks.astype(np.float64) - expected[None]).mean(axis=(1, 2))
                j = int(np.argmin(dist))
                if dist[j] > max_shift * size:
                    continue
                m = crop_to_source(q, size)
                out[i][k] = faces.landmarks[j].astype(np.float64) @ m[:2, :2].T + m[:2, 2]
        return [o.astype(np.float32) for o in out]


def _net_input(images: list, device) -> torch.Tensor:
    """Equal-sized PIL RGB images -> MTCNN's input: float NCHW in channels-last memory,
    (x - 127.5) / 128."""
    a = torch.from_numpy(np.stack([np.asarray(p) for p in images])).to(device)
    return (a.permute(0, 3, 1, 2).float() - 127.5) * 0.0078125


def _proposals(reg: np.ndarray, prob: np.ndarray, scale: float, threshold: float, first: int) -> np.ndarray:
    """P-net's windows with probability >= threshold: [k, 10] = x0, y0, x1, y1 (the 12 x 12
    window at stride 2, in image pixels), score, 4 x regression, image index (+ first)."""
    ii, yy, xx = np.nonzero(prob >= threshold)
    if not len(ii):
        return np.zeros((0, 10), np.float32)
    pos = np.stack([xx, yy], axis=1).astype(np.float32)
    q1, q2 = np.floor((2 * pos + 1) / scale), np.floor((2 * pos + 12) / scale)
    return np.concatenate([q1, q2, prob[ii, yy, xx][:, None], reg[ii, :, yy, xx],
                           (ii + first)[:, None].astype(np.float32)], axis=1).astype(np.float32)


def _nms(boxes: np.ndarray, threshold: float, by_min: bool = False) -> np.ndarray:
    """Greedy non-maximum suppression per image (column 5 or 9: the image index; column 4 the
    score), highest score first; a box goes when its overlap with a kept one exceeds
    `threshold`. Overlap: intersection over union (areas (x1 - x0) * (y1 - y0)), or with
    `by_min` intersection over the smaller area with MTCNN's +1 pixel sizes (its last stage).
    Returns the kept rows' indices."""
    if not len(boxes):
        return np.zeros(0, np.int64)
    img = boxes[:, 9] if boxes.shape[1] > 9 else boxes[:, 5]
    p = 1.0 if by_min else 0.0
    x0, y0, x1, y1, score = (boxes[:, c].astype(np.float64) for c in range(5))
    area = (x1 - x0 + p) * (y1 - y0 + p)
    keep = []
    for k in np.unique(img):
        order = np.flatnonzero(img == k)
        order = order[np.argsort(-score[order], kind="stable")]
        while len(order):
            i, rest = order[0], order[1:]
            keep.append(i)
            iw = np.maximum(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + p, 0.0)
            ih = np.maximum(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + p, 0.0)
            inter = iw * ih
            denom = np.minimum(area[i], area[rest]) if by_min else area[i] + area[rest] - inter
            order = rest[inter <= threshold * denom]
    return np.array(sorted(keep), dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Each box grown to a square on its longer side, about its centre."""
    b = boxes.copy()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    side = np.maximum(w, h)
    b[:, 0] += w * 0.5 - side * 0.5
    b[:, 1] += h * 0.5 - side * 0.5
    b[:, 2] = b[:, 0] + side
    b[:, 3] = b[:, 1] + side
    return b


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply a net's box regression (offsets in units of the box's +1 pixel size)."""
    b = boxes.copy()
    w = (b[:, 2] - b[:, 0] + 1)[:, None]
    h = (b[:, 3] - b[:, 1] + 1)[:, None]
    b[:, 0:4] += reg[:, 0:4] * np.concatenate([w, h, w, h], axis=1)
    return b


def _crops(pils: list, boxes: np.ndarray, size: int, w: int, h: int, device):
    """The candidates' boxes (truncated to integers and clipped to the image, as MTCNN does)
    area-resampled to size x size as one net input; boxes that clip to nothing are dropped.
    Column 5 of `boxes` is the image index."""
    if not len(boxes):
        return boxes, None
    x = np.maximum(np.trunc(boxes[:, 0]), 1).astype(np.int64)
    y = np.maximum(np.trunc(boxes[:, 1]), 1).astype(np.int64)
    ex = np.minimum(np.trunc(boxes[:, 2]), w).astype(np.int64)
    ey = np.minimum(np.trunc(boxes[:, 3]), h).astype(np.int64)
    ok = (ey > y - 1) & (ex > x - 1)
    boxes, x, y, ex, ey = boxes[ok], x[ok], y[ok], ex[ok], ey[ok]
    if not len(boxes):
        return boxes, None
    # One tall image holding every crop: one array conversion instead of one per candidate.
    atlas = Image.new("RGB", (size, size * len(boxes)))
    for k in range(len(boxes)):
        crop = pils[int(boxes[k, 5])].resize((size, size), Image.Resampling.BOX,
                                              box=(int(x[k]) - 1, int(y[k]) - 1, int(ex[k]), int(ey[k])))
        atlas.paste(crop, (0, k * size))
    a = torch.from_numpy(np.array(atlas).reshape(len(boxes), size, size, 3)).to(device)
    return boxes, (a.permute(0, 3, 1, 2).float() - 127.5) * 0.0078125
