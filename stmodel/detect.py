"""MTCNN face detection (facenet-pytorch; its P/R/O-net weights ship inside the package, so
nothing is downloaded) returning plain float32 numpy arrays.

    det = FaceDetector(device="cpu")
    faces = det.detect([rgb_uint8_hxwx3, ...])   # one Faces per image
    faces[0].boxes [n, 4] (x0, y0, x1, y1), .scores [n], .landmarks [n, 5, 2] (x, y)

Landmark order: left eye, right eye, nose, mouth left, mouth right ("left" = image left).
Faces come sorted by box area, largest first. Images are downscaled so that their longer side
is at most `max_side` before detection (results are mapped back to source pixels), zero-padded
to a multiple of `pad_multiple`, and images of equal padded size are detected in one batch.

The three MTCNN stages run on facenet-pytorch's nets and steps (`FaceDetector._run`), with the
pixels resampled by Pillow on the 8-bit image: about half the CPU time of its `detect_face`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


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


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class FaceDetector:
    def __init__(self, device: str | torch.device | None = "auto", min_face_size: int = 20,
                 thresholds=(0.6, 0.7, 0.7), factor: float = 0.709, max_side: int | None = 1024,
                 pad_multiple: int = 32, max_batch: int = 16):
        from facenet_pytorch import MTCNN

        self.device = resolve_device(device)
        self.mtcnn = MTCNN(keep_all=True, select_largest=False, post_process=False, min_face_size=min_face_size,
                           thresholds=list(thresholds), factor=factor, device=self.device).eval()
        self.mtcnn.pnet.to(memory_format=torch.channels_last)  # its convs run ~1.5x faster so on a CPU
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
        """MTCNN's three stages on a batch of equal-sized RGB uint8 images [N, H, W, 3]; returns
        (boxes, points) per image as facenet-pytorch's `detect_face` does, with the same nets,
        thresholds, pyramid scales, box regression and NMS steps. What differs is how pixels are
        resampled: pyramid levels and the R/O-net inputs are area-averaged by Pillow on the 8-bit
        image (BOX filter) instead of torch's area interpolation of a float copy of the whole
        image per level / per candidate, and P-net runs channels-last. That is ~2.5x less CPU
        time on a 1024 x 768 photo, for boxes and points within ~1 px of facenet-pytorch's."""
        from facenet_pytorch.models.utils.detect_face import (batched_nms_numpy, bbreg, generateBoundingBox,
                                                              pad, rerec)
        from torchvision.ops.boxes import batched_nms

        m = self.mtcnn
        n, h, w = stack.shape[:3]
        pils = [Image.fromarray(a, "RGB") for a in stack]
        thresholds = m.thresholds
        scale = 12.0 / float(min_face or m.min_face_size)
        minl = min(h, w) * scale
        boxes, inds = [], []
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
                reg, probs = m.pnet(_net_input(level[k:k + step], self.device))
                b, i = generateBoundingBox(reg, probs[:, 1], scale, thresholds[0])
                i = i + k
                pick = batched_nms(b[:, :4], b[:, 4], i, 0.5)
                boxes.append(b[pick])
                inds.append(i[pick])
            scale *= m.factor
            minl *= m.factor
        if not boxes:
            return [np.zeros((0, 5), np.float32)] * n, [np.zeros((0, 5, 2), np.float32)] * n
        boxes, inds = torch.cat(boxes), torch.cat(inds)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
        boxes, inds = boxes[pick], inds[pick]
        bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        boxes = torch.stack([boxes[:, 0] + boxes[:, 5] * bw, boxes[:, 1] + boxes[:, 6] * bh,
                             boxes[:, 2] + boxes[:, 7] * bw, boxes[:, 3] + boxes[:, 8] * bh, boxes[:, 4]], dim=1)
        boxes = rerec(boxes)

        # R-net on 24 x 24 crops of the candidates, then O-net on 48 x 48 crops of the survivors.
        boxes, inds, x = _crops(pils, boxes, inds, 24, w, h, pad, self.device)
        if len(boxes):
            reg, probs = m.rnet(x)
            keep = probs[:, 1] > thresholds[1]
            boxes = torch.cat([boxes[keep, :4], probs[keep, 1:2]], dim=1)
            inds, reg = inds[keep], reg[keep]
            pick = batched_nms(boxes[:, :4], boxes[:, 4], inds, 0.7)
            boxes = rerec(bbreg(boxes[pick], reg[pick]))
            inds = inds[pick]
        points = torch.zeros(0, 5, 2)
        if len(boxes):
            boxes, inds, x = _crops(pils, boxes, inds, 48, w, h, pad, self.device)
        if len(boxes):
            reg, pts, probs = m.onet(x)
            keep = probs[:, 1] > thresholds[2]
            boxes = torch.cat([boxes[keep, :4], probs[keep, 1:2]], dim=1)
            inds, reg, pts = inds[keep], reg[keep], pts[keep]
            bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
            bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
            points = torch.stack([bw * pts[:, :5] + boxes[:, 0:1] - 1, bh * pts[:, 5:10] + boxes[:, 1:2] - 1], dim=2)
            boxes = bbreg(boxes, reg)
            pick = batched_nms_numpy(boxes[:, :4], boxes[:, 4], inds, 0.7, "Min")
            boxes, inds, points = boxes[pick], inds[pick], points[pick]
        boxes, points, inds = boxes.cpu().numpy(), points.cpu().numpy(), inds.cpu().numpy()
        return [boxes[inds == k] for k in range(n)], [points[inds == k] for k in range(n)]

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


def _crops(pils: list, boxes: torch.Tensor, inds: torch.Tensor, size: int, w: int, h: int, pad, device):
    """The candidates' boxes (clipped to the image, as MTCNN does) area-resampled to size x size
    as one net input; boxes that clip to nothing are dropped, with their rows."""
    if not len(boxes):
        return boxes, inds, None
    y, ey, x, ex = pad(boxes, w, h)
    ok = (ey > y - 1) & (ex > x - 1)
    if not ok.all():
        sel = torch.from_numpy(np.flatnonzero(ok))
        boxes, inds, y, ey, x, ex = boxes[sel], inds[sel], y[ok], ey[ok], x[ok], ex[ok]
    if not len(boxes):
        return boxes, inds, None
    ii = inds.cpu().numpy()
    # One tall image holding every crop: one array conversion instead of one per candidate.
    atlas = Image.new("RGB", (size, size * len(ii)))
    for k in range(len(ii)):
        atlas.paste(pils[int(ii[k])].resize((size, size), Image.Resampling.BOX,
                                            box=(int(x[k]) - 1, int(y[k]) - 1, int(ex[k]), int(ey[k]))), (0, k * size))
    a = torch.from_numpy(np.array(atlas).reshape(len(ii), size, size, 3)).to(device)
    return boxes, inds, (a.permute(0, 3, 1, 2).float() - 127.5) * 0.0078125
