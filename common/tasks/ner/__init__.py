"""The named-entity recognition task, whole: CoNLL or entity-JSON files in, word-piece labels
out, entity-level metrics back.

Shared by hospitals (training, evaluation) and the coordinator (reports, `fedward predict`). One
job per module: `task` is the task object the rest of fedward talks to (`NER`), `formats` reads
files into sentences (the only I/O), `schemes` detects and converts tag schemes, `encoding`
aligns word pieces, `spans` decodes predictions into tags and entity spans, `entity_metrics`
scores them:

    sentence  = [(word, tag), ...]          tags are IOB2 once read: O, B-TYPE, I-TYPE

Files may use IOB1, IOB2, BIOES or BILOU tags; the reader detects which from the data and
converts to IOB2, so the rest of fedward only ever sees one scheme. A word becomes one or more
word pieces in the model; only a word's first piece carries its label (the others get -100,
which the loss ignores), and at evaluation time the prediction on that first piece is the
word's prediction.

Metrics are entity-level, computed with seqeval in *strict* IOB2 mode: an entity counts as
found only if its type and both boundaries match exactly, and a predicted I-TYPE that does not
continue a B-TYPE/I-TYPE of the same type is not an entity at all. (seqeval's default,
conlleval-compatible mode would instead let such a stray I- start an entity.) Strict mode scores
what the tags say under the scheme the model is trained on, and `entity_spans` applies the same
rule, so the entities `fedward predict` prints are exactly the ones the metrics count.
"""

from fedward.common.tasks.ner.encoding import (
    IGNORE_INDEX,
    align_labels,
    cut_long_sentences,
    encode_sentences,
)
from fedward.common.tasks.ner.entity_metrics import ner_metrics
from fedward.common.tasks.ner.formats import (
    CONLL_SUFFIXES,
    JSON_SUFFIXES,
    SPLIT_NAMES,
    read_conll,
    read_conll_splits,
    read_entity_json,
    read_ner_file,
)
from fedward.common.tasks.ner.schemes import (
    PatientSentence,
    Sentence,
    TagScheme,
    detect_scheme,
    label_list,
    to_iob2,
)
from fedward.common.tasks.ner.spans import (
    CJK_CHARACTERS,
    EntitySpan,
    entity_spans,
    labels_to_tags,
    predictions_to_tags,
    predictions_to_word_tags,
    split_words,
)
from fedward.common.tasks.ner.task import NER, NamedEntityRecognition

__all__ = [
    "CJK_CHARACTERS",
    "CONLL_SUFFIXES",
    "IGNORE_INDEX",
    "JSON_SUFFIXES",
    "NER",
    "SPLIT_NAMES",
    "EntitySpan",
    "NamedEntityRecognition",
    "PatientSentence",
    "Sentence",
    "TagScheme",
    "align_labels",
    "cut_long_sentences",
    "detect_scheme",
    "encode_sentences",
    "entity_spans",
    "label_list",
    "labels_to_tags",
    "ner_metrics",
    "predictions_to_tags",
    "predictions_to_word_tags",
    "read_conll",
    "read_conll_splits",
    "read_entity_json",
    "read_ner_file",
    "split_words",
    "to_iob2",
]
