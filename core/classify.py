"""Map exceptions from S3, Pillow, Postgres, Redis and torch to imgq errors. Pure.

It matches on class names and error codes rather than importing botocore, Pillow or torch, so
the producer and the unit tests need none of them; the tests still raise the real exceptions.
"""

from __future__ import annotations

from imgq import errors

_S3_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound", "NoSuchVersion"}
_S3_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId",
              "SignatureDoesNotMatch"}
# Any other S3 code (SlowDown, RequestTimeout, InternalError, 5xx ...) is transient.


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _s3_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = str(response.get("Error", {}).get("Code", "")) or None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or (str(status) if status else None)


def classify(exc: BaseException, ref: str | None = None) -> errors.ImgqError:
    """Return the imgq error that ``exc`` means; unknown errors are transient (retried, bounded).
    ``ref``, the object being read, is named in a not-found or access-denied message (an open
    beneath a root reports only the last path component)."""
    if isinstance(exc, errors.ImgqError):
        return exc
    names = _names(exc)
    text = str(exc)
    if "ClientError" in names:
        code = _s3_code(exc) or ""
        if code in _S3_NOT_FOUND:
            return errors.NotFound(f"S3 object not found ({code})" + (f": {ref}" if ref else ""))
        if code in _S3_DENIED:
            return errors.AccessDenied(f"S3 refused access ({code})" + (f": {ref}" if ref else ""))
        return errors.Retryable(f"S3 error {code}: {text}")
    if "DecompressionBombError" in names or "DecompressionBombWarning" in names:
        return errors.TooManyPixels(text)
    if "UnidentifiedImageError" in names:
        return errors.NotAnImage("Pillow cannot identify the bytes as an image")
    if "FileNotFoundError" in names or "IsADirectoryError" in names:
        return errors.NotFound(f"no such file: {ref or getattr(exc, 'filename', '') or text}")
    if "PermissionError" in names:
        return errors.AccessDenied(f"permission denied: {ref or getattr(exc, 'filename', '') or text}")
    if "OutOfMemoryError" in names:  # torch.OutOfMemoryError: the engine retries smaller batches
        return errors.OutOfMemory(f"{type(exc).__name__}: {text}")
    # Everything else is transient: transport failures (botocore's EndpointConnectionError,
    # ReadTimeoutError ...), database and broker outages, and errors nobody foresaw. The retry
    # budget bounds the last kind; the dead letter then keeps the class name and text.
    return errors.Retryable(f"{type(exc).__name__}: {text}")


def classify_decode(exc: BaseException) -> errors.ImgqError:
    """Errors raised while Pillow decodes: corrupt or short data is permanent, not transient."""
    known = classify(exc)
    if not isinstance(known, errors.Retryable) or "MemoryError" in _names(exc):
        return known
    text = str(exc)
    if "truncated" in text.lower() or "premature end" in text.lower():
        return errors.Truncated(text)
    return errors.Truncated(f"corrupt image data ({type(exc).__name__}: {text})")


# Outages of the services a worker depends on: nothing was settled, so the message goes back.
# kombu's BatchPublishError is a failed flush of the publish pipeline (imgq.publish): Redis
# refused it (full, read-only after a failover) or went away. Not one, a worker's retries on a full
# Redis dead-lettered their items as internal_error (tests/integration/test_transport.py).
_OUTAGE_NAMES = {"OperationalError", "InterfaceError", "DisconnectionError", "ConnectionError",
                 "TimeoutError", "BusyLoadingError", "OperationalException", "ConnectionRefusedError",
                 "RedisError", "BrokenPipeError", "BatchPublishError"}


def is_outage(exc: BaseException) -> bool:
    """True for Postgres/Redis being unreachable (or a settle that timed out): worth requeueing.
    Anything else raised while handling a message is a bug or an unforeseen input."""
    return bool(_names(exc) & _OUTAGE_NAMES)
