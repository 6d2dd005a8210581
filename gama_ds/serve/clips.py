"""A request's clip -> the model's features, through the training front end (gama_ds.audio).

The header is read first, so that a clip of the wrong kind or length is refused before any
decoding; what is then decoded and turned into fbank features is exactly what conversion does
for training data (resample to 16 kHz, first channel, Kaldi fbank, normalise, first 1024 frames).
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import soundfile

from .. import audio
from .api_errors import ApiError

# The formats OpenAI's input_audio names that libsndfile reads, and what its header calls them.
FORMATS = {"wav": {"WAV", "WAVEX", "RF64"}, "mp3": {"MP3"}, "flac": {"FLAC"}, "ogg": {"OGG"}}


def decode_base64(data: str, param: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ApiError(
            400,
            f"{param}.data is not base64 (send the encoded file's bytes, without a data: prefix)",
            f"{param}.data",
            "invalid_base64",
        ) from None


def check_format(fmt: str, param: str) -> None:
    if fmt not in FORMATS:
        raise ApiError(
            415,
            f"{param}.format {fmt!r} is not supported; send one of {', '.join(FORMATS)}",
            f"{param}.format",
            "unsupported_audio_format",
        )


def clip_features(data: bytes, fmt: str, max_seconds: float, param: str) -> np.ndarray:
    """Normalised, unpadded fbank [n <= 1024, 128] of an encoded clip; ApiError when it is not one."""
    check_format(fmt, param)
    if not data:
        raise ApiError(400, f"{param}.data is empty: no audio", f"{param}.data", "empty_audio")
    try:
        header = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise ApiError(
            400, f"{param}: not a readable {fmt} file: {err}", f"{param}.data", "invalid_audio"
        ) from None
    kinds = {kind for kind, names in FORMATS.items() if header.format in names}
    if not kinds:
        raise ApiError(
            415,
            f"{param}: the data is {header.format} audio; send one of {', '.join(FORMATS)}",
            f"{param}.data",
            "unsupported_audio_format",
        )
    if fmt not in kinds:
        raise ApiError(
            400,
            f"{param}: the data is {header.format} audio, not {fmt} as its format says",
            f"{param}.format",
            "audio_format_mismatch",
        )
    _check_length(header.frames / max(header.samplerate, 1), max_seconds, param)
    try:
        features, clip = audio.load_features(data)
    except audio.AudioError as err:
        code = err.reason.replace(" ", "_")
        raise ApiError(400, f"{param}: {err.reason}: {err.detail}", f"{param}.data", code) from None
    _check_length(clip.duration, max_seconds, param)  # a header's length can be an estimate (mp3)
    return features


def _check_length(seconds: float, max_seconds: float, param: str) -> None:
    if seconds > max_seconds:
        raise ApiError(
            400,
            f"{param}: the clip is {seconds:.1f} s, over the server's limit of {max_seconds:g} s "
            "(--max-audio-s)",
            f"{param}.data",
            "audio_too_long",
        )


def spectrogram(features: np.ndarray) -> dict:
    """The features as the model sees them, for drawing: frames x 128 mel bins scaled to 0-255."""
    lo, hi = float(features.min()), float(features.max())
    scaled = np.round((features - lo) / max(hi - lo, 1e-6) * 255).astype(np.uint8)
    return {
        "frames": int(features.shape[0]),
        "bins": int(features.shape[1]),
        "frame_shift_ms": 10,
        "max_frames": audio.TARGET_FRAMES,
        "data": base64.b64encode(scaled.tobytes()).decode("ascii"),
    }
