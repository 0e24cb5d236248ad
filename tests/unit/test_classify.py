import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from imgq import errors
from imgq.classify import classify, classify_decode


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


@pytest.mark.parametrize(
    ("exc", "code", "permanent"),
    [
        (client_error("NoSuchKey", 404), "not_found", True),
        (client_error("404", 404), "not_found", True),
        (client_error("AccessDenied", 403), "access_denied", True),
        (client_error("SlowDown", 503), "transient", False),
        (client_error("InternalError", 500), "transient", False),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), "transient", False),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), "transient", False),
        (FileNotFoundError(2, "No such file", "/x.jpg"), "not_found", True),
        (PermissionError(13, "denied", "/x.jpg"), "access_denied", True),
        (RuntimeError("surprise"), "transient", False),
        (errors.TooLarge("big"), "too_large", True),
    ],
)
def test_classify_table(exc, code, permanent):
    got = classify(exc)
    assert got.code == code
    assert isinstance(got, errors.Permanent) is permanent


def test_pillow_errors():
    from PIL import Image, UnidentifiedImageError

    assert classify(UnidentifiedImageError("cannot identify")).code == "not_an_image"
    assert classify(Image.DecompressionBombError("too big")).code == "too_many_pixels"
    assert classify_decode(OSError("image file is truncated (3 bytes not processed)")).code == "truncated"
    assert classify_decode(SyntaxError("broken PNG file")).code == "truncated"
    assert classify_decode(MemoryError()).code == "transient"
