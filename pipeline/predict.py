"""Answers out: text through a built artifact's tokenizer, its engine and its head's post-processing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import store
from .compare import pooled_embeddings
from .errors import ArtifactError, InputError


@dataclass
class Predictor:
    """A loaded artifact that answers text: `Predictor.load(dir).predict(["a sentence"])`."""

    engine: Any
    tokenizer: Any
    task: str
    axis_ranges: dict[str, tuple[int, int]]
    labels: dict[int, str] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None, allow_failed: bool = False,
             public_key: str | Path | None = None) -> Predictor:
        """The engine checked and loaded as `store.load` does, and the tokenizer it carries."""
        directory = Path(directory)
        engine = store.load(directory, device, allow_failed=allow_failed, public_key=public_key)
        meta = store.read_manifest(directory)
        if not meta.get("tokenizer"):
            raise ArtifactError(f"{directory} carries no tokenizer (its model had none, or it was saved by kiln run): "
                                f"it answers token ids only; build it with kiln build from a model with a tokenizer")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        model = meta.get("model") or {}
        ranges = {k: (int(v[0]), int(v[1])) for k, v in (meta.get("axis_ranges") or {}).items()}
        return cls(engine, tokenizer, str(model.get("task", "encoder")), ranges,
                   {int(k): str(v) for k, v in (model.get("labels") or {}).items()})

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """One answer per text: label and score (classifier), normalized sentence embedding
        (encoder), next token (causal LM), the token at each mask (masked LM), a label per token
        (token classifier)."""
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("predict takes a list of one or more strings")
        if self.task == "question-answering":
            raise InputError("predict does not take question answering yet (it needs question and context pairs)")
        lo_b, hi_b = self.axis_ranges.get("batch", (1, len(texts)))
        out: list[dict[str, Any]] = []
        for at in range(0, len(texts), hi_b):
            out += self._batch(list(texts[at:at + hi_b]), lo_b)
        return out

    def _batch(self, texts: list[str], min_batch: int) -> list[dict[str, Any]]:
        lo_s, hi_s = self.axis_ranges.get("seq", (1, 512))
        tok = self.tokenizer
        if self.task == "causal-lm" and tok.pad_token is None:
            tok.pad_token = tok.eos_token  # GPT-2 style tokenizers have no pad token; the mask hides it
        enc = tok(texts, padding="longest", truncation=True, max_length=hi_s, return_tensors="pt")
        ids, mask = enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        if ids.shape[1] < lo_s:  # the engine's shortest sequence: pad, masked out
            extra = lo_s - ids.shape[1]
            ids = torch.cat([ids, torch.full((ids.shape[0], extra), pad_id)], 1)
            mask = torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=torch.int64)], 1)
        rows = len(texts)
        if rows < min_batch:  # the engine's smallest batch: repeat the last row, drop its answers
            ids, mask = torch.cat([ids, ids[-1:].expand(min_batch - rows, -1)]), torch.cat([mask, mask[-1:].expand(min_batch - rows, -1)])
        device = getattr(self.engine, "device", "cpu")
        outs = {k: v.detach().cpu().float()[:rows] for k, v in self.engine({"input_ids": ids.to(device), "attention_mask": mask.to(device)}).items()}
        ids, mask = ids[:rows], mask[:rows]
        if not all(bool(torch.isfinite(v).all()) for v in outs.values()):
            raise ArtifactError("the engine returned NaN or Inf for this input: no answer is better than a wrong one")
        first = next(iter(outs.values()))
        if self.task == "classification":
            probs = first.softmax(-1)
            score, idx = probs.max(-1)
            return [{"text": t, "label": self.labels.get(int(i), str(int(i))), "score": round(float(s), 6)}
                    for t, i, s in zip(texts, idx, score)]
        if self.task == "encoder":
            emb = pooled_embeddings(first, mask)
            return [{"text": t, "embedding": [round(float(x), 6) for x in e]} for t, e in zip(texts, emb)]
        if self.task == "causal-lm":
            last = mask.sum(1) - 1
            probs = first[torch.arange(rows), last].softmax(-1)
            score, idx = probs.max(-1)
            return [{"text": t, "next_token": tok.decode([int(i)]), "token_id": int(i), "score": round(float(s), 6)}
                    for t, i, s in zip(texts, idx, score)]
        if self.task == "masked-lm":
            if tok.mask_token_id is None:
                raise InputError("this tokenizer has no mask token")
            answers = []
            for r, t in enumerate(texts):
                where = (ids[r] == tok.mask_token_id).nonzero().flatten().tolist()
                answers.append({"text": t, "fills": [tok.decode([int(first[r, p].argmax())]) for p in where]})
            return answers
        # token classification: a label per real token
        answers = []
        for r, t in enumerate(texts):
            special = set(tok.all_special_ids)
            pairs = [(tok.decode([int(i)]), self.labels.get(int(first[r, p].argmax()), str(int(first[r, p].argmax()))))
                     for p, i in enumerate(ids[r].tolist()) if mask[r, p] and i not in special]
            answers.append({"text": t, "tokens": pairs})
        return answers
