"""Task heads fedward puts on a base encoder where transformers has none that fits: note
classification reads the mean of the token states. Its own module (torch, nothing of fedward's),
so that the task that owns the head and the model code that splits it import it from here and
neither imports the other."""

from __future__ import annotations

import torch


class MeanPoolClassifier(torch.nn.Module):
    """Encoder, mean of the token states under the attention mask, dropout, linear head.

    The head of note classification (`common/tasks/classification.py`).

    Sentence-embedding models such as all-MiniLM-L6-v2 are trained to be read through the mean
    of their token states; their [CLS] pooler is an untrained leftover. Under DP the difference
    is large: on Medical Abstracts a DP-SGD linear head (epsilon 8, 3 hospitals) reached macro-F1
    about 0.6 on mean-pooled features and 0.15-0.42 on the pooler's output.
    """

    def __init__(self, encoder: torch.nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.dropout = torch.nn.Dropout(hidden_dropout(encoder.config))
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, **_):
        # fedward's batches carry ids, mask and labels only; PEFT may add keywords it does not use.
        # `inputs_embeds` is how the top of a split model receives the cached prefix states.
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
            device = input_ids.device if input_ids is not None else inputs_embeds.device
            attention_mask = torch.ones(shape, dtype=torch.long, device=device)
        states = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def hidden_dropout(config) -> float:
    """The dropout a family's config sets on hidden states: BERT's `hidden_dropout_prob`,
    DistilBERT's `dropout`, ModernBERT's `classifier_dropout` (it has no hidden dropout)."""
    for name in ("hidden_dropout_prob", "dropout", "classifier_dropout"):
        value = getattr(config, name, None)
        if isinstance(value, int | float):
            return float(value)
    return 0.1
