"""Languages, translate parameters and the translate kind's place in a job. Pure."""

from __future__ import annotations

import pytest

from imgq import errors
from imgq.kinds import parse_kinds, spec
from imgq.languages import LANGUAGES, language, parse_langs


def test_parse_langs_normalises_deduplicates_and_drops_english():
    assert parse_langs(" DE, fr,de ,en,") == ["de", "fr"]
    assert parse_langs(["ja", "zh"]) == ["ja", "zh"]
    assert parse_langs(None) == []


def test_an_unknown_language_is_refused_with_its_own_code():
    with pytest.raises(errors.UnknownLanguage) as caught:
        parse_langs("de,xx")
    assert caught.value.code == "unknown_language" and "'xx'" in caught.value.message and "de" in caught.value.message


def test_every_language_has_a_flores_code_of_its_script():
    for code, lang in LANGUAGES.items():
        assert lang.nllb[:3].isalpha() and lang.nllb[3] == "_"
        assert lang.latin == lang.nllb.endswith("_Latn"), code
    assert language("ja").nllb == "jpn_Jpan"


def test_translate_params_refuse_unknown_source_and_repeated_languages():
    params = spec("translate").parse({"langs": ["de", "fr"]})
    assert params.langs == ["de", "fr"]
    for bad in (["xx"], ["en"], ["de", "de"], []):
        with pytest.raises(errors.BadParams):
            spec("translate").parse({"langs": bad})


def test_translate_runs_after_caption_in_the_same_job():
    assert parse_kinds("translate,caption") == ["caption", "translate"]
    with pytest.raises(errors.BadParams, match="caption,translate"):
        parse_kinds("translate")
    with pytest.raises(errors.BadParams):
        parse_kinds("embed,translate")


def test_caption_params_with_an_adapter():
    params = spec("caption").parse({"adapter": "de-news"})
    assert params.canonical()["adapter"] == "de-news"
    with pytest.raises(errors.BadParams, match="explain"):
        spec("caption").parse({"adapter": "de-news", "explain": True})
