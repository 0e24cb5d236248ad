"""Every cross-field problem of caption parameters, word for word and at its boundary, and what a
parameter set's identity keeps (its canonical form). Slower API and CLI tests reach these too; these
pin them in milliseconds (mutation testing runs the fastest covering tests only)."""

from __future__ import annotations

import pytest

from imgq.params import MAX_TEXT_POSITIONS, CaptionParams, EmbedParams, TranslateParams


def flag(field: str) -> str:
    return f"--{field.replace('_', '-')}"


def test_explain_with_an_adapter_names_both_fields_through_the_namer():
    params = CaptionParams.model_validate({"explain": True, "adapter": "de"}, context={"fields_only": True})
    assert params.problems(flag) == ["--explain is not available with --adapter"]


def test_the_prompt_bound_counts_words_plus_two_positions_plus_new_tokens():
    # "a b" is 2 words: 2 + 2 + 508 = 512 positions fit exactly; one more token does not.
    assert CaptionParams(prompt="a b", max_new_tokens=MAX_TEXT_POSITIONS - 4).problems(flag) == []
    over = CaptionParams.model_validate({"prompt": "a b", "max_new_tokens": MAX_TEXT_POSITIONS - 3},
                                        context={"fields_only": True})
    assert over.problems(flag) == [
        "--prompt (2 words) plus --max-new-tokens (509) exceeds the model's 512 text positions"]


def test_the_longest_prompt_leaves_room_for_254_new_tokens():
    words = " ".join(["w"] * 256)  # 511 characters, the most a prompt may have
    assert CaptionParams(prompt=words, max_new_tokens=254).problems() == []
    params = CaptionParams.model_validate({"prompt": words, "max_new_tokens": 255}, context={"fields_only": True})
    assert params.problems() == [
        "prompt (256 words) plus max_new_tokens (255) exceeds the model's 512 text positions"]


def test_every_problem_of_one_parameter_set_is_listed_in_order():
    params = CaptionParams.model_validate(
        {"min_new_tokens": 9, "max_new_tokens": 3, "top_k": 5, "seed": 1, "explain": True, "adapter": "fr",
         "prompt": "  "}, context={"fields_only": True})
    assert params.problems(flag) == [
        "--min-new-tokens (9) exceeds --max-new-tokens (3)",
        "--top-k only applies with sampling (--do-sample)",
        "--seed only applies with sampling (--do-sample)",
        "--explain is not available with --adapter",
        "--prompt must not be blank; omit it for unconditional captions",
    ]


def test_the_canonical_form_of_default_caption_parameters_leaves_out_unset_newer_fields():
    assert CaptionParams().canonical() == {
        "max_new_tokens": 30, "min_new_tokens": 0, "num_beams": 1, "do_sample": False, "top_p": 1.0, "top_k": 50,
        "temperature": 1.0, "repetition_penalty": 1.0, "prompt": None, "seed": None, "resize": "stretch"}


@pytest.mark.parametrize(("fields", "kept"), [({"explain": True}, {"explain": True}),
                                              ({"adapter": "de"}, {"adapter": "de"})])
def test_explain_and_adapter_are_part_of_the_identity_only_when_set(fields: dict, kept: dict):
    canonical = CaptionParams(**fields).canonical()
    assert {k: canonical[k] for k in kept} == kept
    assert canonical.keys() - kept.keys() == CaptionParams().canonical().keys()


def test_canonical_forms_are_json_values():
    assert EmbedParams().canonical() == {"resize": "stretch"}
    assert TranslateParams(langs=["de", "fr"]).canonical() == {"langs": ["de", "fr"], "resize": "stretch"}
    assert type(CaptionParams(top_p=0.5, do_sample=True).canonical()["top_p"]) is float
