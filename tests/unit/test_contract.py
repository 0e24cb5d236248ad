import pytest

from imgq.contract import MESSAGE_VERSION, CaptionParams, TaskMessage, make_task, parse_params
from imgq.errors import BadParams
from imgq.kinds import KINDS, parse_kinds, spec
from imgq.params import EmbedParams, ValidateParams, validate_params


def test_defaults_are_greedy_captioning():
    params = parse_params({})
    assert (params.num_beams, params.do_sample, params.max_new_tokens, params.resize) == (1, False, 30, "stretch")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"min_new_tokens": 40, "max_new_tokens": 20}, "exceeds max_new_tokens"),
        ({"num_beams": 99}, "num_beams"),
        ({"temperature": 0.7}, "temperature only applies with sampling (do_sample)"),
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
    msg = TaskMessage(job="j", tasks=[make_task("caption", "m", CaptionParams(num_beams=2))],
                      items=[(0, "s3://b/k"), (5, "/x")])
    data = msg.to_json()
    assert data["v"] == MESSAGE_VERSION
    again = TaskMessage.model_validate(data)
    assert again == msg
    with pytest.raises(ValueError):
        TaskMessage.model_validate({**data, "v": 99})
    with pytest.raises(ValueError):
        TaskMessage.model_validate({**data, "items": []})


def test_every_problem_is_named_in_one_line():
    with pytest.raises(BadParams) as info:
        parse_params({"temperature": 0.5, "top_k": 3, "num_beams": 0})
    message = info.value.message
    assert "num_beams" in message and "temperature only applies" in message and "top_k only applies" in message
    assert "\n" not in message


def test_problems_can_be_named_in_the_callers_words():
    flag = {"do_sample": "--sample"}.get
    with pytest.raises(BadParams) as info:
        validate_params(CaptionParams, {"temperature": 0.5, "num_beams": 0, "min_new_tokens": 9, "max_new_tokens": 3},
                        name=lambda f: flag(f) or "--" + f.replace("_", "-"))
    message = info.value.message
    assert "--num-beams: " in message and "--temperature only applies with sampling (--sample)" in message
    assert "--min-new-tokens (9) exceeds --max-new-tokens (3)" in message
    assert "num_beams" not in message and "do_sample" not in message


def test_tasks_are_a_union_discriminated_on_kind():
    data = {"job": "j", "items": [[0, "/x"]], "tasks": [
        {"kind": "caption", "model": "c", "params": {"num_beams": 3}},
        {"kind": "embed", "model": "e", "params": {"resize": "letterbox"}},
    ]}
    msg = TaskMessage.model_validate(data)
    assert [type(t.params) for t in msg.tasks] == [CaptionParams, EmbedParams]
    assert msg.kinds == ["caption", "embed"]
    with pytest.raises(ValueError, match="Extra inputs"):  # embed has no generation parameters
        TaskMessage.model_validate({**data, "tasks": [{"kind": "embed", "model": "e", "params": {"num_beams": 3}}]})
    with pytest.raises(ValueError, match="appears twice"):
        TaskMessage.model_validate({**data, "tasks": [data["tasks"][0], data["tasks"][0]]})
    with pytest.raises(ValueError):
        TaskMessage.model_validate({**data, "tasks": [{"kind": "translate", "model": "t", "params": {}}]})


def test_pair_kinds_need_a_text_per_item_and_image_kinds_refuse_one():
    validate = {"kind": "validate", "model": "r", "params": {}}
    msg = TaskMessage.model_validate({"job": "j", "tasks": [validate], "items": [[0, "/x", "a dog"]]})
    assert msg.items == [(0, "/x", "a dog")] and isinstance(msg.tasks[0].params, ValidateParams)
    with pytest.raises(ValueError, match="need"):
        TaskMessage.model_validate({"job": "j", "tasks": [validate], "items": [[0, "/x"]]})
    with pytest.raises(ValueError, match="pairs"):
        TaskMessage.model_validate({"job": "j", "tasks": [{"kind": "embed", "model": "r", "params": {}}],
                                    "items": [[0, "/x", "text"]]})


def test_version_1_messages_in_flight_across_an_upgrade_are_read_as_caption_tasks():
    v1 = {"v": 1, "job": "j", "kind": "caption", "model": "m", "params": {"num_beams": 2}, "items": [[0, "/x"]]}
    msg = TaskMessage.model_validate(v1)
    assert msg.v == 2 and msg.tasks == [make_task("caption", "m", CaptionParams(num_beams=2))]


def test_kind_registry_names_every_part_of_a_kind():
    assert parse_kinds("embed, caption,embed") == ["caption", "embed"]
    with pytest.raises(BadParams, match="unknown job kind 'nope'"):
        parse_kinds("caption,nope")
    with pytest.raises(BadParams):
        parse_kinds(" , ")
    assert spec("validate").input == "pair" and spec("embed").family == spec("validate").family
    for kind in KINDS.values():  # every runner and writer path names a real class
        module, _, attr = kind.writer.partition(":")
        assert attr and module.startswith("imgq.db.results.")
        assert kind.runner.startswith("imgq.worker.runners:")
    assert CaptionParams(num_beams=4).batch_cost() == 4 and EmbedParams().batch_cost() == 1


MESSAGE_OF_THREE = ("invalid generation parameters: num_beams: Input should be greater than or equal to 1; "
                    "top_k only applies with sampling (do_sample); temperature only applies with sampling (do_sample)")


def test_the_problems_are_joined_in_one_exact_line():
    with pytest.raises(BadParams) as info:
        parse_params({"temperature": 0.5, "top_k": 3, "num_beams": 0})
    assert info.value.message == MESSAGE_OF_THREE


@pytest.mark.parametrize("raw", [[1, 2], "greedy", 7])
def test_parameters_that_are_not_an_object_say_what_they_should_be(raw):
    with pytest.raises(BadParams) as info:
        validate_params(CaptionParams, raw)  # type: ignore[arg-type]
    assert info.value.message == "invalid parameters: Input should be a valid dictionary or instance of CaptionParams"
