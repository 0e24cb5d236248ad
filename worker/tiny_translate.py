"""A tiny random NLLB-architecture translation checkpoint, for tests, benchmarks and the offline demo
(no model hub needed).

The layout mirrors ``facebook/nllb-200-distilled-600M``: an ``M2M100ForConditionalGeneration`` with
NLLB's special ids (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2 = decoder start, ``<unk>`` 3), scaled and tied
embeddings, and an ``NllbTokenizer`` that knows all 202 FLORES-200 language codes (``eng_Latn``,
``deu_Latn``, ...) as special tokens, so it is driven exactly like the real model: ``src_lang =
"eng_Latn"`` and ``forced_bos_token_id`` = the target code's id. Widths, depths and vocabulary are tiny.

The tokenizer is a sentencepiece BPE model trained here, in about 0.1 s, on a fixed generated text
(English caption-like sentences with some German, French and Spanish ones); its pieces are put in
fairseq order as NLLB's converter does. transformers 5 builds ``NllbTokenizer`` from the ``tokenizers``
library and converts a ``.model`` file only through protobuf, which is not installed here, so the
vocabulary, merges and normalisation table (``precompiled_charsmap``, read from the model proto with
the small wire-format reader below) are passed to its constructor directly. ``sentencepiece.bpe.model``
is saved beside ``tokenizer.json`` as in the real repository; transformers loads ``tokenizer.json``.

Random weights translate into noise. Two choices make the noise useful to tests: weights far larger
than the default init, so the output depends visibly on the input sentence and on the target
language, and the embedding rows of the language codes scaled down (the output projection is tied to
them), so greedy decoding almost never emits a language code, which would decode to "" and look like
an empty translation; ``</s>``'s row is scaled up, so some outputs end early and others run to the
caller's token budget: their lengths vary.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import torch

from imgq.languages import LANGUAGES
from imgq.worker.loading import quiet_bars_off_a_terminal
from imgq.worker.tiny import install_checkpoint

FORMAT = 1
SPM_FILE = "sentencepiece.bpe.model"  # the name NLLB's repository uses
_SPM_VOCAB = 1000  # pieces asked of sentencepiece (fewer are kept if the text has fewer)
_WEIGHT_STD = 0.5
_LANG_ROW_SCALE = 0.05  # language-code embeddings (and so their logits) this much smaller
# </s>'s embedding this much larger: with 1.0 greedy decoding never ended a sentence (every output ran
# to the token budget); with 4.0 about one in seven of 180 translations ended early, none empty.
_EOS_ROW_SCALE = 4.0

# Caption-like English (what BLIP writes) and a little German, French and Spanish, so the pieces
# include accented letters and the target languages' common words.
_EN = {
    "subject": "a man|a woman|a young boy|a little girl|two people|a group of people|a dog|a black cat|a brown horse|"
               "a large elephant|a giraffe|a flock of birds|a baseball player|a person|a red bus|a white truck|"
               "a train|an airplane|a small boat|a motorcycle|a plate of food|a pizza|a laptop computer|a teddy bear",
    "verb": "sitting on|standing next to|walking down|riding|holding|eating|looking at|lying on|flying over|"
            "parked in front of|playing with|running across|jumping over|driving down|floating on",
    "object": "a bench|the street|a busy city street|a wooden table|the beach|a grassy field|a snowy mountain|"
              "a kitchen counter|a river|the ocean|a park|a brick building|a dirt road|a frisbee|a surfboard|"
              "a skateboard|an umbrella|a clock tower|a sandy beach|a tennis court",
    "tail": "|||| on a sunny day| at night| in the rain| with trees in the background| near a fence|"
            " in front of a crowd| next to a parked car| with a blue sky",
}
_FOREIGN = [
    "ein Mann sitzt auf einer Bank|eine Frau geht die Straße entlang|ein Hund spielt mit einem Ball|"
    "zwei Menschen fahren Fahrrad|ein roter Bus vor einem großen Gebäude|eine Katze liegt auf dem Sofa|"
    "ein Zug fährt über eine Brücke|ein Teller mit Essen auf dem Tisch|Kinder spielen am Strand",
    "un homme assis sur un banc|une femme marche dans la rue|un chien joue avec une balle|"
    "deux personnes font du vélo|un bus rouge devant un grand bâtiment|un chat couché sur le canapé|"
    "un train traverse un pont|une assiette de nourriture sur la table|des enfants jouent à la plage",
    "un hombre sentado en un banco|una mujer camina por la calle|un perro juega con una pelota|"
    "dos personas montan en bicicleta|un autobús rojo frente a un edificio grande|un gato acostado en el sofá|"
    "un tren cruza un puente|un plato de comida en la mesa|niños jugando en la playa",
]


def corpus(lines: int = 480) -> list[str]:
    """The fixed training text of the tokenizer: ``lines`` sentences, the same every time."""
    rng = random.Random(12)
    parts = {k: v.split("|") for k, v in _EN.items()}
    foreign = [s for group in _FOREIGN for s in group.split("|")]
    out = []
    for i in range(lines):
        if i % 4 == 3:
            out.append(rng.choice(foreign) + rng.choice([".", "", " und ein Hund", " et un chien", " y un perro"]))
        else:
            words = [rng.choice(parts[k]) for k in ("subject", "verb", "object", "tail")]
            out.append(" ".join(words).strip())
    return out


def write_tiny_translation_checkpoint(directory: Path, *, seed: int = 0) -> Path:
    """Write (or reuse) a tiny random NLLB-architecture checkpoint in ``directory`` and return it.

    Deterministic for a given ``seed``; an existing complete checkpoint with the same settings is
    returned untouched. The files are written beside the target and renamed into place, with the
    marker file last, so a concurrent writer or a crash never leaves a half-written checkpoint that
    looks complete."""
    marker = {"kind": "translate", "format": FORMAT, "seed": seed}
    # A file, or a non-empty folder without a tiny checkpoint's marker, is refused (CheckpointFolderError):
    # only an earlier tiny checkpoint is ever replaced.
    return install_checkpoint(Path(directory), marker, lambda out: _write(out, seed=seed))


def _write(out: Path, *, seed: int) -> None:
    from transformers import GenerationConfig, M2M100Config, M2M100ForConditionalGeneration

    tokenizer = _tokenizer(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "<pad>", "</s>", "<unk>")}
    assert list(ids.values()) == [0, 1, 2, 3], ids  # NLLB's fairseq ids: a broken vocab must never be saved
    codes = [lang.nllb for lang in LANGUAGES.values()]
    lang_ids = tokenizer.convert_tokens_to_ids(codes)
    assert ids["<unk>"] not in lang_ids, "a FLORES-200 code of imgq.languages is missing from the tokenizer"
    config = M2M100Config(
        vocab_size=len(tokenizer),
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=1024,  # NLLB's; sinusoidal, so no parameters
        scale_embedding=True,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        decoder_start_token_id=ids["</s>"],
        tokenizer_class="NllbTokenizer",
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        model = M2M100ForConditionalGeneration(config).eval()
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, _WEIGHT_STD)
            # The output projection is tied to these rows: small rows, small logits.
            special = sorted({*tokenizer.all_special_ids, *lang_ids} - {ids["</s>"]})
            embeddings = model.get_input_embeddings().weight
            embeddings[special] *= _LANG_ROW_SCALE
            embeddings[ids["</s>"]] *= _EOS_ROW_SCALE
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
        decoder_start_token_id=ids["</s>"], max_length=200,  # NLLB's
    )
    quiet_bars_off_a_terminal()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _tokenizer(out: Path) -> Any:
    """Train the sentencepiece model, save it as ``sentencepiece.bpe.model``, and wrap it as NLLB's."""
    import sentencepiece as spm
    from transformers import NllbTokenizer
    from transformers.tokenization_utils_base import generate_merges

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buffer, model_type="bpe", vocab_size=_SPM_VOCAB,
        hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2,
        # the defaults, spelled out: NLLB's model has the same normaliser and control pieces
        normalization_rule_name="nmt_nfkc", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    )
    proto = buffer.getvalue()
    (out / SPM_FILE).write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    # fairseq order, as transformers' NllbConverter makes it: <s> <pad> </s> <unk>, then the pieces
    # after sentencepiece's own three control pieces; the language codes and <mask> follow.
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for i in range(3, sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    tokenizer = NllbTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),  # what transformers' SentencePieceExtractor derives for BPE
        _spm_precompiled_charsmap=_precompiled_charsmap(proto),
        src_lang="eng_Latn",
        model_max_length=1024,
    )
    return tokenizer


def _precompiled_charsmap(proto: bytes) -> bytes | None:
    """``normalizer_spec.precompiled_charsmap`` of a sentencepiece ``ModelProto`` (fields 3, then 2)."""
    spec = next((v for field, v in _fields(proto) if field == 3), None)
    if spec is None:
        return None
    return next((v for field, v in _fields(spec) if field == 2), None)


def _fields(data: bytes) -> list[tuple[int, Any]]:
    """Top-level (field number, value) pairs of a protobuf message; length-delimited values as bytes."""
    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, i

    fields: list[tuple[int, Any]] = []
    i = 0
    while i < len(data):
        key, i = varint(i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire == 2:
            size, i = varint(i)
            value, i = data[i : i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = data[i : i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields.append((field, value))
    return fields
