"""Languages a caption can be asked for (``--lang de,fr``): ISO 639-1 codes, the NLLB-200 code of each
(the default translation model's), and whether BLIP-base's English WordPiece vocabulary can spell it.

Pure. What a route supports follows from this table (README, "Captions in other languages"):
translation takes every language here; an adapter (a LoRA on BLIP's decoder, which writes only
tokens its vocabulary has) is useful only for Latin-script languages unless its tokenizer is extended.
"""

from __future__ import annotations

from dataclasses import dataclass

from imgq.errors import UnknownLanguage


@dataclass(frozen=True, slots=True)
class Language:
    code: str  # ISO 639-1
    name: str
    nllb: str  # FLORES-200 code: NLLB's target-language token
    latin: bool  # written in Latin script (BLIP's WordPiece vocabulary covers it, save some accents)


_TABLE = [
    ("en", "English", "eng_Latn", True), ("de", "German", "deu_Latn", True), ("fr", "French", "fra_Latn", True),
    ("es", "Spanish", "spa_Latn", True), ("it", "Italian", "ita_Latn", True), ("pt", "Portuguese", "por_Latn", True),
    ("nl", "Dutch", "nld_Latn", True), ("sv", "Swedish", "swe_Latn", True), ("da", "Danish", "dan_Latn", True),
    ("nb", "Norwegian Bokmål", "nob_Latn", True), ("fi", "Finnish", "fin_Latn", True),
    ("pl", "Polish", "pol_Latn", True), ("cs", "Czech", "ces_Latn", True), ("ro", "Romanian", "ron_Latn", True),
    ("hu", "Hungarian", "hun_Latn", True), ("tr", "Turkish", "tur_Latn", True),
    ("id", "Indonesian", "ind_Latn", True), ("vi", "Vietnamese", "vie_Latn", True),
    ("sw", "Swahili", "swh_Latn", True), ("ru", "Russian", "rus_Cyrl", False), ("uk", "Ukrainian", "ukr_Cyrl", False),
    ("el", "Greek", "ell_Grek", False), ("ar", "Arabic", "arb_Arab", False), ("he", "Hebrew", "heb_Hebr", False),
    ("hi", "Hindi", "hin_Deva", False), ("bn", "Bengali", "ben_Beng", False), ("th", "Thai", "tha_Thai", False),
    ("ja", "Japanese", "jpn_Jpan", False), ("ko", "Korean", "kor_Hang", False),
    ("zh", "Chinese (simplified)", "zho_Hans", False),
]
LANGUAGES: dict[str, Language] = {code: Language(code, name, nllb, latin) for code, name, nllb, latin in _TABLE}
SOURCE = "en"  # BLIP-base captions in English


def language(code: str) -> Language:
    try:
        return LANGUAGES[code.strip().lower()]
    except KeyError:
        raise UnknownLanguage(f"unknown language {code!r}; known: {', '.join(sorted(LANGUAGES))}") from None


def parse_langs(text: str | list[str] | None) -> list[str]:
    """``"de, fr,de"`` -> ``["de", "fr"]``: known ISO 639-1 codes, de-duplicated, in the order given.
    English is the caption itself, so it is dropped (it is always stored)."""
    if text is None:
        return []
    parts = text.split(",") if isinstance(text, str) else text
    codes = [language(part).code for part in parts if part.strip()]
    return [code for code in dict.fromkeys(codes) if code != SOURCE]
