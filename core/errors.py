"""One error tree. Users see the stable ``code`` of a permanent error in the dead-letter store."""

from __future__ import annotations


class ImgqError(Exception):
    """An imgq operation failed."""

    code = "error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or self.code).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class Retryable(ImgqError):
    """A transient failure: the same work may succeed if tried again later."""

    code = "transient"


class Permanent(ImgqError):
    """The item can never succeed as submitted; it is dead-lettered on the first try."""

    code = "permanent"


class InvalidRequest(ImgqError):
    """A request was refused before anything was accepted."""

    code = "invalid_request"


def _permanent(code: str, doc: str) -> type[Permanent]:
    return type(f"Permanent_{code}", (Permanent,), {"code": code, "__doc__": doc})


# Stable codes: documented in README "Error codes"; never rename one.
NotFound = _permanent("not_found", "The object or file does not exist.")
AccessDenied = _permanent("access_denied", "The store refused access to the object.")
Empty = _permanent("empty", "The object has zero bytes.")
TooLarge = _permanent("too_large", "The object is larger than IMGQ_MAX_OBJECT_BYTES.")
NotAnImage = _permanent("not_an_image", "The bytes are not an image Pillow recognises.")
UnsupportedFormat = _permanent("unsupported_format", "The image format is not on the decoder allow-list.")
Truncated = _permanent("truncated", "The image data ends early or is corrupt.")
TooManyPixels = _permanent("too_many_pixels", "The image exceeds IMGQ_MAX_PIXELS (decompression-bomb guard).")
BadRef = _permanent("bad_ref", "The reference is malformed or outside the allow-lists.")
ModelError = _permanent("model_error", "The model failed on this single item.")


class BadParams(InvalidRequest):
    """Generation parameters are invalid."""

    code = "bad_params"


class RefRefused(InvalidRequest):
    """A reference is malformed or outside the allow-lists."""

    code = "bad_ref"


class ModelUnavailable(ImgqError):
    """The model could not be loaded."""

    code = "model_unavailable"


class ConfigError(ImgqError):
    """The configuration is inconsistent."""

    code = "config_error"
