"""The status vocabulary of every table row: one word per outcome, defined here only.

A row is `ok` or one failure status; `skipped` rows are counted and never written. A failure is
*transient* (a later run tries the input again by default: the same input may well succeed) or
*permanent* (the same input would fail the same way; retried only with `retry_failed=true`).
"""
from __future__ import annotations

STATUS_OK = "ok"
STATUS_SKIPPED = "skipped"              # already done: counted, never written
STATUS_LOST = "lost"                    # went into the pipeline and never came back (worker crash)
STATUS_WORKER_CRASH = "worker_crash"    # crashed its worker on every attempt, alone in its batch

# input files and images (pipeline.decode, pipeline.inputs, align)
STATUS_READ_ERROR = "read_error"
STATUS_WRITE_ERROR = "write_error"
STATUS_DECODE_ERROR = "decode_error"            # empty, truncated, not an image, corrupt pixel data
STATUS_TOO_LARGE = "too_large"                  # over the byte cap, or more pixels than max_pixels
STATUS_TOO_SMALL = "too_small"                  # smaller than min_image_side, or every face below min_face_px
STATUS_UNSUPPORTED_FORMAT = "unsupported_format"
STATUS_MULTI_FRAME = "multi_frame"
STATUS_NO_FACE = "no_face"                      # the detector found nothing above min_score
STATUS_ALIGN_ERROR = "align_error"              # unexpected failure in detection / alignment / writing the crop
STATUS_DUPLICATE = "duplicate"                  # same bytes as another file of this run

# model stages
STATUS_INVERT_ERROR = "invert_error"
STATUS_EVALUATE_ERROR = "evaluate_error"
STATUS_EDIT_ERROR = "edit_error"
STATUS_MODEL_MISMATCH = "model_mismatch"        # a code made by another model than the one loaded
STATUS_BAD_REQUEST = "bad_request"              # an edit request that cannot be run as written
STATUS_BAD_CODE = "bad_code"                    # a code with NaN / inf
STATUS_PASTE_ERROR = "paste_error"

TRANSIENT_STATUSES = frozenset({
    STATUS_READ_ERROR, STATUS_WRITE_ERROR, STATUS_LOST, STATUS_WORKER_CRASH, STATUS_INVERT_ERROR, STATUS_ALIGN_ERROR,
    STATUS_EVALUATE_ERROR, STATUS_EDIT_ERROR, STATUS_MODEL_MISMATCH,
})
