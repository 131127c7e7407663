"""`fedward predict`: load base model + global adapter and label notes or find entities."""

from __future__ import annotations

from pathlib import Path

import torch

from fedward.common.model import load_adapter_for_inference


@torch.no_grad()
def predict_texts(adapter_dir: str | Path, texts: list[str]) -> list[str]:
    """One printable line (or block) per text: label and probability, or entities with spans."""
    model, tokenizer, meta = load_adapter_for_inference(adapter_dir)
    labels = meta["labels"]
    lines = []
    for text in texts:
        if meta["task"] == "ner":
            lines.append(_entities_line(model, tokenizer, labels, text, meta["max_length"]))
            continue
        encoded = tokenizer(
            text, truncation=True, max_length=meta["max_length"], return_tensors="pt"
        )
        probabilities = model(**encoded).logits.float().softmax(dim=-1)[0]
        best = int(probabilities.argmax())
        lines.append(f"{labels[best]}\t{float(probabilities[best]):.3f}\t{_clip(text)}")
    return lines


def _entities_line(model, tokenizer, labels: list[str], text: str, max_length: int) -> str:
    from fedward.common.ner import entity_spans, predictions_to_word_tags, split_words

    words, offsets = split_words(text)
    if not words:
        return f"(no words)\t{_clip(text)}"
    encoded = tokenizer(
        words, is_split_into_words=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    predictions = model(**encoded).logits.argmax(dim=-1)[0].tolist()
    id_to_label = dict(enumerate(labels))
    tags = predictions_to_word_tags(predictions, encoded.word_ids(0), id_to_label, len(words))
    spans = entity_spans(words, tags, text=text, offsets=offsets)
    found = "; ".join(
        f"{span.entity_type} '{span.text}' [{span.start_char}:{span.end_char}]" for span in spans
    )
    return f"{found or '(no entities)'}\t{_clip(text)}"


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
