"""The report's images: read once each, downscaled and embedded as `data:` URIs.

An embedded image is a `DataURI`: the page's own data, which the template prints untouched
(redaction is for text a dataset supplies; base64 text can look like `...;base64,...key...=`
and would no longer decode). A missing or unreadable image becomes a placeholder with the reason.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from pipeline import storage


class DataURI(str):
    """A `data:image/...;base64,` URI made by this module (never text from a dataset)."""


@dataclass
class Thumb:
    """One image cell: the embedded image (None: a placeholder saying `reason`), its caption,
    its tooltip, the longer side it is shown at, and its natural size (`size`, pixels)."""
    src: DataURI | None
    caption: str = ""
    title: str = ""
    px: int = 128
    reason: str = ""
    size: tuple[int, int] = (0, 0)

    @property
    def shown(self) -> tuple[int, int]:
        """Width and height on the page: the longer side at `px`, so that a 32-pixel
        reconstruction sits at the size of the crop it is compared with."""
        w, h = self.size
        if not (w and h):
            return self.px, self.px
        scale = self.px / max(w, h)
        return max(1, round(w * scale)), max(1, round(h * scale))


def thumbnail_data_uri(data: bytes, max_px: int = 128, fmt: str = "png") -> tuple[DataURI, tuple[int, int]]:
    """Decode image bytes, downscale so the longer side is <= max_px; the data: URI and the
    thumbnail's size."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as src:
        im = ImageOps.exif_transpose(src)
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGBA").convert("RGB") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB")
        im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        if fmt.lower() in ("jpg", "jpeg"):
            im.convert("RGB").save(buf, format="JPEG", quality=85)
            mime = "jpeg"
        else:
            im.save(buf, format="PNG", optimize=True)
            mime = "png"
    return DataURI(f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")), im.size


class Images:
    """Reads, downscales and embeds images once each; a missing one becomes a placeholder."""

    def __init__(self, root: str, old_roots: list[str], px: int, fmt: str):
        self.root, self.px, self.fmt = root, int(px), fmt
        self.old_roots = sorted({r.rstrip("/") for r in old_roots if isinstance(r, str) and r
                                 and r.rstrip("/") != root.rstrip("/")}, key=len, reverse=True)
        self.cache: dict[tuple, tuple[DataURI | None, str, tuple[int, int]]] = {}
        self.embedded = 0
        self.missing = 0

    def _candidates(self, uri: str) -> list[str]:
        if "://" not in uri and not uri.startswith("/"):
            return [storage.join(self.root, uri)]
        out = [uri]
        for old in self.old_roots:  # the dataset was moved or copied: rebase onto this root
            if uri.startswith(old + "/"):
                out.append(storage.join(self.root, uri[len(old) + 1:]))
        return out

    def data_uri(self, uri: str | None, px: int | None = None) -> tuple[DataURI | None, str, tuple[int, int]]:
        """(the data: URI or None, why it is None, the thumbnail's size)."""
        px = int(px or self.px)
        if not uri:
            return None, "no image", (0, 0)
        key = (uri, px)
        if key not in self.cache:
            res: tuple[DataURI | None, str, tuple[int, int]] = (None, "missing", (0, 0))
            for cand in self._candidates(uri):
                try:
                    src, size = thumbnail_data_uri(storage.read_bytes(cand), px, self.fmt)
                    res = (src, "", size)
                    break
                except FileNotFoundError:
                    res = (None, "missing", (0, 0))
                except Exception as e:  # noqa: BLE001
                    res = (None, f"unreadable: {type(e).__name__}", (0, 0))
            self.cache[key] = res
            if res[0]:
                self.embedded += 1
            else:
                self.missing += 1
        return self.cache[key]

    def thumb(self, uri: str | None, caption: str = "", title: str = "", px: int | None = None) -> Thumb:
        src, why, size = self.data_uri(uri, px)
        return Thumb(src, caption, f"{title or caption}\n{uri or ''}".strip(), int(px or self.px), why, size)
