"""MTCNN face detection (facenet-pytorch; its P/R/O-net weights ship inside the package, so
nothing is downloaded) returning plain float32 numpy arrays.

    det = FaceDetector(device="cpu")
    faces = det.detect([rgb_uint8_hxwx3, ...])   # one Faces per image
    faces[0].boxes [n, 4] (x0, y0, x1, y1), .scores [n], .landmarks [n, 5, 2] (x, y)

Landmark order: left eye, right eye, nose, mouth left, mouth right ("left" = image left).
Faces come sorted by box area, largest first. Images are downscaled so that their longer side
is at most `max_side` before detection (results are mapped back to source pixels), zero-padded
to a multiple of `pad_multiple`, and images of equal padded size are detected in one batch.
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
        self.max_side = int(max_side) if max_side else None
        self.pad_multiple = max(1, int(pad_multiple))
        self.max_batch = max(1, int(max_batch))

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        h, w = image.shape[:2]
        scale = 1.0
        if self.max_side and max(h, w) > self.max_side:
            scale = self.max_side / float(max(h, w))
            nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
            image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0))
            scale = nw / float(w)  # the exact factor actually applied along x (y agrees to < 1 px)
        m = self.pad_multiple
        ph, pw = -image.shape[0] % m, -image.shape[1] % m
        if ph or pw:
            image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        return image, scale

    @torch.inference_mode()
    def _run(self, stack: np.ndarray, min_face: int | None = None):
        from facenet_pytorch.models.utils.detect_face import detect_face

        m = self.mtcnn
        return detect_face(torch.from_numpy(stack), min_face or m.min_face_size, m.pnet, m.rnet, m.onet,
                           m.thresholds, m.factor, self.device)

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
        boxes4, scores = b[:, :4] / scale, b[:, 4]
        lms = p / scale
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
