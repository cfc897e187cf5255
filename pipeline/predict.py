"""Answers out: text (or images) through a built artifact's tokenizer (or image processor), its engine and its head's post-processing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import manifest, store
from .errors import ArtifactError, InputError
from .heads import HEADS, Asked


@dataclass
class Predictor:
    """A loaded artifact that answers text (`Predictor.load(dir).predict(["a sentence"])`) or, for an
    image model, image files (`.predict(["cat.png"])`). `tokenizer` is the image processor then."""

    engine: Any
    tokenizer: Any
    task: str
    axis_ranges: dict[str, tuple[int, int]]
    labels: dict[int, str] = field(default_factory=dict)
    image_dims: tuple[Any, ...] = ()  # an image model's pixel_values dims (batch, channels, height, width)

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None, allow_failed: bool = False,
             public_key: str | Path | None = None) -> Predictor:
        """The engine checked and loaded as `store.load` does, and the tokenizer it carries."""
        directory = Path(directory)
        engine = store.load(directory, device, allow_failed=allow_failed, public_key=public_key)
        meta = manifest.read(directory)
        task = meta.model.task if meta.model else "encoder"
        image = task in HEADS and HEADS[task].vision
        if not (meta.processor if image else meta.tokenizer):
            what, takes = ("image processor", "pixel tensors") if image else ("tokenizer", "token ids")
            raise ArtifactError(f"{directory} carries no {what} (its model had none, or it was saved by kiln run): "
                                f"it answers {takes} only; build it with kiln build from a model with a {what}")
        if task not in HEADS:  # a head registered where it was built, not here
            raise ArtifactError(f"{directory} is a {task!r} model: this Kiln knows no such head, so cannot answer with it")
        import transformers

        auto = transformers.AutoImageProcessor if image else transformers.AutoTokenizer
        pre = auto.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        dims = tuple(meta.inputs.get("pixel_values", {}).get("dims", ())) if image else ()
        labels = meta.model.labels if meta.model and meta.model.labels else {}
        return cls(engine, pre, task, dict(meta.axis_ranges), {int(k): str(v) for k, v in labels.items()}, dims)

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """One answer per text: label and score (classifier), normalized sentence embedding
        (encoder), next token (causal LM), the token at each mask (masked LM), a label per token
        (token classifier)."""
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("predict takes a list of one or more strings" + (" (image file paths)" if self.image_dims else ""))
        head = HEADS[self.task]
        if head.answer is None:
            raise InputError(head.no_answer or f"predict does not answer with a {self.task} head")
        lo_b, hi_b = self.axis_ranges.get("batch", (1, len(texts)))
        out: list[dict[str, Any]] = []
        for at in range(0, len(texts), hi_b):
            out += self._batch(list(texts[at:at + hi_b]), lo_b)
        if not self.image_dims:  # text over the built range was cut to it: each such answer says so
            hi_s = self.axis_ranges.get("seq", (1, 512))[1]
            for answer, text in zip(out, texts):
                n = len(self.tokenizer(text)["input_ids"])
                if n > hi_s:
                    answer["truncated"] = {"tokens": n, "kept": hi_s}
        return out

    def _images(self, paths: list[str]) -> dict[str, torch.Tensor]:
        from PIL import Image, UnidentifiedImageError

        images = []
        for p in paths:
            try:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            except (OSError, UnidentifiedImageError) as e:
                raise InputError(f"cannot read image {p}: {e}") from e
        pixels = self.tokenizer(images=images, return_tensors="pt")["pixel_values"].to(torch.float32)
        want = tuple(self.image_dims[1:])
        if tuple(pixels.shape[1:]) != want:
            raise InputError(f"the artifact's image processor makes {tuple(pixels.shape[1:])} pixel tensors; the engine "
                             f"was built for {want}: rebuild from a model whose processor and config agree")
        return {"pixel_values": pixels}

    def _text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        lo_s, hi_s = self.axis_ranges.get("seq", (1, 512))
        tok = self.tokenizer
        if HEADS[self.task].generates and tok.pad_token is None:
            tok.pad_token = tok.eos_token  # GPT-2 style tokenizers have no pad token; the mask hides it
        # Text longer than the built range is cut to it (the tokenizer truncates); `kiln predict` warns.
        enc = tok(texts, padding="longest", truncation=True, max_length=hi_s, return_tensors="pt")
        ids, mask = enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        if ids.shape[1] < lo_s:  # the engine's shortest sequence: pad, masked out, on the tokenizer's side
            extra = lo_s - ids.shape[1]
            pad, zero = torch.full((ids.shape[0], extra), pad_id), torch.zeros(mask.shape[0], extra, dtype=torch.int64)
            left = getattr(tok, "padding_side", "right") == "left"
            ids, mask = (torch.cat([pad, ids], 1), torch.cat([zero, mask], 1)) if left else (torch.cat([ids, pad], 1), torch.cat([mask, zero], 1))
        return {"input_ids": ids, "attention_mask": mask}

    def _batch(self, texts: list[str], min_batch: int) -> list[dict[str, Any]]:
        inputs = self._images(texts) if self.image_dims else self._text(texts)
        rows = len(texts)
        if rows < min_batch:  # the engine's smallest batch: repeat the last row, drop its answers
            inputs = {k: torch.cat([v, v[-1:].expand(min_batch - rows, *v.shape[1:])]) for k, v in inputs.items()}
        device = getattr(self.engine, "device", "cpu")
        outs = {k: v.detach().cpu().float()[:rows] for k, v in self.engine({k: v.to(device) for k, v in inputs.items()}).items()}
        if not all(bool(torch.isfinite(v).all()) for v in outs.values()):
            raise ArtifactError("the engine returned NaN or Inf for this input: no answer is better than a wrong one")
        ids, mask = (None, None) if self.image_dims else (inputs["input_ids"][:rows], inputs["attention_mask"][:rows])
        answer = HEADS[self.task].answer
        assert answer is not None  # checked by predict()
        return answer(Asked(texts, next(iter(outs.values())), ids, mask, self.tokenizer, self.labels))
