"""imgq.classify where test_classify.py's table could not tell: an S3 error code and HTTP status that
agree (NoSuchKey with 404) hide a broken reading of either; the decode messages users read in dead
letters; and is_outage, which decides whether a message goes back to the broker, had no test below e2e."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.exceptions import ClientError

from imgq import errors
from imgq.classify import classify, classify_decode, is_outage


def s3_error(response: dict[str, Any]) -> ClientError:
    return ClientError(response, "GetObject")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("response", "kind", "message"),
    [
        # The code wins over the status.
        ({"Error": {"Code": "NoSuchKey"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
         errors.NotFound, "S3 object not found (NoSuchKey)"),
        ({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
         errors.AccessDenied, "S3 refused access (AccessDenied)"),
        # No code (a HEAD request's error has no body): the status decides.
        ({"Error": {}, "ResponseMetadata": {"HTTPStatusCode": 403}}, errors.AccessDenied, "S3 refused access (403)"),
        ({"Error": {"Code": ""}, "ResponseMetadata": {"HTTPStatusCode": 404}}, errors.NotFound,
         "S3 object not found (404)"),
        ({"ResponseMetadata": {"HTTPStatusCode": 404}}, errors.NotFound, "S3 object not found (404)"),
        # No status either.
        ({"Error": {"Code": "NoSuchBucket"}}, errors.NotFound, "S3 object not found (NoSuchBucket)"),
    ],
)
def test_an_s3_error_is_read_from_its_code_then_its_status(response: dict[str, Any], kind: type, message: str) -> None:
    got = classify(s3_error(response))
    assert type(got) is kind
    assert str(got) == message


def test_an_s3_error_with_neither_code_nor_status_is_transient_and_says_so() -> None:
    exc = s3_error({})
    got = classify(exc)
    assert type(got) is errors.Retryable
    assert str(got) == f"S3 error : {exc}"


def test_a_transient_s3_error_names_its_code_and_the_error() -> None:
    exc = s3_error({"Error": {"Code": "SlowDown", "Message": "Reduce your request rate"},
                    "ResponseMetadata": {"HTTPStatusCode": 503}})
    got = classify(exc)
    assert type(got) is errors.Retryable
    assert str(got) == ("S3 error SlowDown: An error occurred (SlowDown) when calling the GetObject operation: "
                        "Reduce your request rate")


def test_a_client_error_without_a_response_is_transient() -> None:
    class ClientError(Exception):  # matched by class name, like any other library's ClientError
        pass

    got = classify(ClientError("boom"))
    assert type(got) is errors.Retryable
    assert str(got) == "S3 error : boom"


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (OSError("image file is truncated (3 bytes not processed)"), "image file is truncated (3 bytes not processed)"),
        (OSError("Image file is TRUNCATED"), "Image file is TRUNCATED"),
        (SyntaxError("Premature end of JPEG file"), "Premature end of JPEG file"),
        (SyntaxError("broken PNG file"), "corrupt image data (SyntaxError: broken PNG file)"),
        (ValueError("tile cannot extend outside image"),
         "corrupt image data (ValueError: tile cannot extend outside image)"),
    ],
)
def test_decode_errors_are_truncated_and_keep_what_pillow_said(exc: BaseException, message: str) -> None:
    got = classify_decode(exc)
    assert type(got) is errors.Truncated
    assert str(got) == message


@pytest.mark.parametrize(
    ("exc", "outage"),
    [
        (ConnectionRefusedError(111, "refused"), True),
        (BrokenPipeError(32, "broken pipe"), True),
        (TimeoutError("settle timed out"), True),
        (type("OperationalError", (Exception,), {})("server closed the connection"), True),
        (type("InterfaceError", (Exception,), {})("connection already closed"), True),
        (type("DisconnectionError", (Exception,), {})(), True),
        (type("BusyLoadingError", (Exception,), {})(), True),
        (type("OperationalException", (Exception,), {})(), True),
        (type("RedisError", (Exception,), {})(), True),
        (type("ConnectionError", (Exception,), {})(), True),
        (type("BatchPublishError", (Exception,), {})("Redis publish batch failed"), True),  # kombu's flush
        # a subclass of an outage is one too (class names along the MRO)
        (type("Refused", (ConnectionRefusedError,), {})(), True),
        (ValueError("bad input"), False),
        (KeyError("seq"), False),
        (FileNotFoundError(2, "No such file"), False),
        (RuntimeError("bug"), False),
    ],
)
def test_only_an_unreachable_database_or_broker_is_an_outage(exc: BaseException, outage: bool) -> None:
    assert is_outage(exc) is outage


class OutOfMemoryError(RuntimeError):  # torch.OutOfMemoryError, matched by class name
    pass


class DecompressionBombError(Exception):  # PIL.Image.DecompressionBombError, by class name
    pass


class DecompressionBombWarning(Warning):  # PIL.Image.DecompressionBombWarning, raised as an error
    pass


class UnidentifiedImageError(OSError):  # PIL.UnidentifiedImageError, by class name
    pass


@pytest.mark.parametrize(
    ("exc", "kind", "message"),
    [
        (DecompressionBombError("Image size (200000000 pixels) exceeds limit"), errors.TooManyPixels,
         "Image size (200000000 pixels) exceeds limit"),
        (DecompressionBombWarning("Image size (100000000 pixels) could be a bomb"), errors.TooManyPixels,
         "Image size (100000000 pixels) could be a bomb"),
        (UnidentifiedImageError("cannot identify image file <_io.BytesIO>"), errors.NotAnImage,
         "Pillow cannot identify the bytes as an image"),
        (FileNotFoundError(2, "No such file or directory", "/data/a.jpg"), errors.NotFound,
         "no such file: /data/a.jpg"),
        (FileNotFoundError("gone"), errors.NotFound, "no such file: gone"),
        (IsADirectoryError(21, "Is a directory", "/data/dir"), errors.NotFound, "no such file: /data/dir"),
        (PermissionError(13, "Permission denied", "/data/b.jpg"), errors.AccessDenied,
         "permission denied: /data/b.jpg"),
        (PermissionError("nope"), errors.AccessDenied, "permission denied: nope"),
        (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), errors.OutOfMemory,
         "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
        (ConnectionResetError("peer closed"), errors.Retryable, "ConnectionResetError: peer closed"),
        (KeyError("x"), errors.Retryable, "KeyError: 'x'"),
    ],
)
def test_what_each_branch_tells_the_dead_letter(exc: BaseException, kind: type, message: str) -> None:
    got = classify(exc)
    assert type(got) is kind
    assert str(got) == message
