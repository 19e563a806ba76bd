"""Frames out of video files (LeRobot's ``videos/<camera>/chunk-*/file-*.mp4``), without torchvision.

Decoding is PyAV's (FFmpeg's decoders, AV1 included: the ``video`` extra). :func:`video_frames`
seeks to the key frame before the first wanted timestamp, decodes forward and keeps, for each
wanted timestamp, the frame shown at it (within half a frame period), re-encoded PNG / JPEG one
frame at a time: one episode's frames are never held decoded all at once.
"""

from __future__ import annotations

import numpy as np

from distcur.sources.common import SourceFormatError, encode_image


def video_frames(file, timestamps: np.ndarray, fps: float, where: str, fmt: str = "png") -> list[bytes]:
    """Encoded frames of ``file`` (a path or a binary file object) at the sorted ``timestamps`` (s)."""
    from distcur.deps import require

    av = require("av", "decoding LeRobot video frames")
    ts = np.asarray(timestamps, np.float64)
    if not len(ts):
        return []
    if np.any(np.diff(ts) <= 0):
        raise ValueError(f"{where}: timestamps must increase")
    tol = 0.5 / float(fps)
    out: list[bytes] = []
    try:
        with av.open(file) as container:
            if not container.streams.video:
                raise SourceFormatError(f"{where}: no video stream")
            stream = container.streams.video[0]
            start = max(0.0, ts[0] - tol)
            container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * stream.time_base)
                if t < ts[len(out)] - tol:
                    continue
                if t > ts[len(out)] + tol:
                    raise SourceFormatError(f"{where}: no frame at timestamp {ts[len(out)]:.4f} s (the next decoded "
                                            f"frame is at {t:.4f} s)")
                out.append(encode_image(frame.to_ndarray(format="rgb24"), fmt))
                if len(out) == len(ts):
                    return out
    except av.error.FFmpegError as e:
        raise SourceFormatError(f"{where}: cannot decode the video ({type(e).__name__}: {e})") from None
    raise SourceFormatError(f"{where}: the video ends before timestamp {ts[len(out)]:.4f} s "
                            f"({len(out)} of {len(ts)} frames found)")
