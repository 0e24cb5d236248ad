import pytest

from imgq.contract import MESSAGE_VERSION, CaptionParams, TaskMessage, parse_params
from imgq.errors import BadParams


def test_defaults_are_greedy_captioning():
    params = parse_params({})
    assert (params.num_beams, params.do_sample, params.max_new_tokens, params.resize) == (1, False, 30, "stretch")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": 40, "max_new_tokens": 20}, "exceeds max_new_tokens"),
        ({"num_beams": 99}, "num_beams"),
        ({"temperature": 0.7}, "temperature only applies with do_sample"),
        ({"do_sample": True, "top_p": 1.5}, "top_p"),
        ({"do_sample": True, "temperature": 0}, "temperature"),
        ({"resize": "squash"}, "resize"),
        ({"prompt": "   "}, "prompt must not be blank"),
        ({"beams": 3}, "beams: Extra inputs are not permitted"),
    ],
)
def test_invalid_params_are_refused_with_the_reason(raw, fragment):
    with pytest.raises(BadParams) as info:
        parse_params(raw)
    assert fragment in info.value.message
    assert info.value.code == "bad_params"
    assert "\n" not in info.value.message


def test_digest_is_stable_and_distinguishes_params():
    a = parse_params({"num_beams": 3})
    assert a.digest() == parse_params({"num_beams": 3}).digest()
    assert a.digest() != parse_params({"num_beams": 2}).digest()
    assert a.digest() != parse_params({"num_beams": 3, "prompt": "a photo of"}).digest()


def test_message_round_trips_through_json():
    msg = TaskMessage(job="j", model="m", params=CaptionParams(num_beams=2), items=[(0, "s3://b/k"), (5, "/x")])
    data = msg.to_json()
    assert data["v"] == MESSAGE_VERSION
    again = TaskMessage.model_validate(data)
    assert again == msg
    with pytest.raises(ValueError):
        TaskMessage.model_validate({**data, "v": 99})
    with pytest.raises(ValueError):
        TaskMessage.model_validate({**data, "items": []})
