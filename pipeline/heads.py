"""Every head a model can have, one record each: how it loads, what it returns, how its outputs
agree with the reference's, and how it answers in `kiln predict`. A new head is one `register`
call (docs/extending.md); nothing else in Kiln names a head.

torch is imported inside the functions: the CLI lists the heads without it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# (accumulator, candidate, reference fp32, eager at the precision, valid [batch, seq], mask or None):
# appends this batch's agreement to the accumulator's "agree"/"eager_agree" (and its extras) and sets its "kind"
Agreement = Callable[[dict[str, Any], "torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor | None"], None]


@dataclass(frozen=True)
class Asked:
    """One batch `kiln predict` asked of an engine: the texts (or image paths), the first output
    [batch, ...] on the host, the token ids and mask (text), the tokenizer and the labels."""

    texts: list[str]
    first: torch.Tensor
    ids: torch.Tensor | None
    mask: torch.Tensor | None
    tokenizer: Any
    labels: dict[int, str]

    def label(self, i: Any) -> str:
        return self.labels.get(int(i), str(int(i)))


@dataclass(frozen=True)
class Head:
    """`auto_class`: the transformers Auto class that loads it; `outputs`: what it returns;
    `architectures`: the endings of the class names a config.json names it by (ForMaskedLM);
    `base`: the bare trunk (loaded by the checkpoint's own *Model class); `labelled`: config.id2label
    names its classes; `per_position`: its [batch, seq] outputs are one value per token (span
    logits), so padding is masked there; `agreement` and `answer`: None where it has none;
    `mapping`: the task of transformers' auto mapping that lists its classes
    (MODEL_FOR_<mapping>_MAPPING_NAMES), which says what a class serves where its name cannot
    (Wav2Vec2ForSequenceClassification classifies audio)."""

    name: str
    auto_class: str
    outputs: tuple[str, ...] = ("logits",)
    architectures: tuple[str, ...] = ()
    vision: bool = False
    generates: bool = False
    base: bool = False
    labelled: bool = False
    per_position: bool = False
    agreement: Agreement | None = None
    answer: Callable[[Asked], list[dict[str, Any]]] | None = None
    no_answer: str = ""  # why `kiln predict` does not take it, where `answer` is None
    mapping: str = ""
    options: int = 0  # multiple choice: each row holds this many options, its text inputs [batch, options, seq]


HEADS: dict[str, Head] = {}


def register(head: Head) -> Head:
    if head.name in HEADS or head.name == "generic":  # generic: a module given as it is, no head
        raise ValueError(f"a head named {head.name!r} is already registered")
    HEADS[head.name] = head
    return head


@functools.cache
def _auto_mappings() -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """transformers' auto mappings, by task: (the model types, the class names) it lists."""
    from transformers.models.auto import modeling_auto

    out = {}
    for name in dir(modeling_auto):
        if name.startswith("MODEL_FOR_") and name.endswith("_MAPPING_NAMES"):
            mapping = getattr(modeling_auto, name)
            out[name[len("MODEL_FOR_"):-len("_MAPPING_NAMES")]] = (
                frozenset(mapping), frozenset(c for v in mapping.values() for c in ((v,) if isinstance(v, str) else v)))
    return out


def model_types(task: str) -> frozenset[str]:
    """The model types transformers has a class for at `task` (CTC: wav2vec2, hubert, ...)."""
    return _auto_mappings().get(task, (frozenset(), frozenset()))[0]


def transformers_tasks(arch: str) -> list[str]:
    """The tasks transformers lists the class `arch` under (BertForMultipleChoice: MULTIPLE_CHOICE)."""
    return [task for task, (_, classes) in _auto_mappings().items() if arch in classes]


def of_architecture(arch: str) -> Head | None:
    """The head a class serves (BertForMaskedLM: masked-lm), by transformers' mappings where it
    lists the class, else by the name's ending; None for a bare model or a head Kiln does not serve."""
    tasks = transformers_tasks(arch)
    for h in HEADS.values():  # a head registered without a mapping (a plugin's) goes by its endings
        if not h.base and ((h.mapping in tasks) if tasks and h.mapping else any(map(arch.endswith, h.architectures))):
            return h
    return None


def pooled_embeddings(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over valid tokens, L2-normalized: how sentence-transformers turns MiniLM into embeddings.
    An output shorter than its input (Funnel pools the sequence) is averaged over all its positions."""
    import torch

    if mask is None or mask.shape != hidden.shape[:2]:
        m = torch.ones(hidden.shape[:2], dtype=hidden.dtype)
    else:
        m = mask.to(hidden.dtype).cpu()
    pooled = (hidden * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _nearest(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(-1)


def label_agreement(a: dict[str, Any], c: torch.Tensor, r: torch.Tensor, e: torch.Tensor, valid: torch.Tensor,
                    mask: torch.Tensor | None) -> None:
    """One label per row: the argmax agrees."""
    if c.dim() == 2:
        a["kind"] = "label"
        a["agree"].append((c.argmax(-1) == r.argmax(-1)).double())
        a["eager_agree"].append((e.argmax(-1) == r.argmax(-1)).double())


def span_agreement(a: dict[str, Any], c: torch.Tensor, r: torch.Tensor, e: torch.Tensor, valid: torch.Tensor,
                   mask: torch.Tensor | None) -> None:
    """A span boundary per row: the argmax over real tokens (never a padding position) agrees."""
    if c.dim() == 2 and valid.shape == c.shape:
        a["kind"] = "span"
        pick = lambda x: x.masked_fill(~valid, -math.inf).argmax(-1)  # noqa: E731
        a["agree"].append((pick(c) == pick(r)).double())
        a["eager_agree"].append((pick(e) == pick(r)).double())


def token_agreement(a: dict[str, Any], c: torch.Tensor, r: torch.Tensor, e: torch.Tensor, valid: torch.Tensor,
                    mask: torch.Tensor | None) -> None:
    """One prediction per token position: top-1 (and top-5 overlap) over the unpadded positions."""
    if c.dim() == 3:
        a["kind"] = "top1"
        top_r = r.argmax(-1)[valid]
        a["agree"].append((c.argmax(-1)[valid] == top_r).double())
        a["eager_agree"].append((e.argmax(-1)[valid] == top_r).double())
        k = min(5, c.shape[-1])
        tc, tr = c.topk(k, -1).indices[valid], r.topk(k, -1).indices[valid]
        a["top5"].append((tc.unsqueeze(-1) == tr.unsqueeze(-2)).any(-1).double().mean(-1))


def ranking_agreement(a: dict[str, Any], c: torch.Tensor, r: torch.Tensor, e: torch.Tensor, valid: torch.Tensor,
                      mask: torch.Tensor | None) -> None:
    """Sentence embeddings (mean-pooled): their cosine, and each row's nearest neighbour agrees."""
    if c.dim() == 3:
        a["kind"] = "nn-ranking"
        ec, er, ee = (pooled_embeddings(x, mask) for x in (c, r, e))
        a["emb_cos"].append((ec * er).sum(-1))
        a["eager_emb_cos"].append((ee * er).sum(-1))
        if c.shape[0] >= 3:
            nn_r = _nearest(er)
            a["agree"].append((_nearest(ec) == nn_r).double())
            a["eager_agree"].append((_nearest(ee) == nn_r).double())


def pixel_agreement(a: dict[str, Any], c: torch.Tensor, r: torch.Tensor, e: torch.Tensor, valid: torch.Tensor,
                    mask: torch.Tensor | None) -> None:
    """A label per pixel ([batch, labels, height, width]): each image's share of pixels whose argmax agrees."""
    if c.dim() == 4:
        a["kind"] = "pixel-label"
        top_r = r.argmax(1)
        a["agree"].append((c.argmax(1) == top_r).double().flatten(1).mean(1))
        a["eager_agree"].append((e.argmax(1) == top_r).double().flatten(1).mean(1))


def _rounded(v: torch.Tensor) -> list[float]:
    return [round(float(x), 6) for x in v]


def _labels(key: str) -> Callable[[Asked], list[dict[str, Any]]]:
    def answer(q: Asked) -> list[dict[str, Any]]:
        score, idx = q.first.softmax(-1).max(-1)
        return [{key: t, "label": q.label(i), "score": round(float(s), 6)} for t, i, s in zip(q.texts, idx, score)]

    return answer


def _segments(q: Asked) -> list[dict[str, Any]]:
    """Each image's labels by the share of its pixels they cover, largest first."""
    out = []
    for path, labels in zip(q.texts, q.first.argmax(1)):
        ids, counts = labels.unique(return_counts=True)
        share = sorted(zip(counts.tolist(), ids.tolist()), reverse=True)
        out.append({"image": path, "labels": {q.label(i): round(n / labels.numel(), 6) for n, i in share}})
    return out


def _image_embedding(q: Asked) -> list[dict[str, Any]]:
    import torch

    emb = torch.nn.functional.normalize(q.first.mean(1), dim=-1)  # mean over patches
    return [{"image": t, "embedding": _rounded(e)} for t, e in zip(q.texts, emb)]


def _embedding(q: Asked) -> list[dict[str, Any]]:
    return [{"text": t, "embedding": _rounded(e)} for t, e in zip(q.texts, pooled_embeddings(q.first, q.mask))]


def _next_token(q: Asked) -> list[dict[str, Any]]:
    import torch

    assert q.mask is not None
    rows = len(q.texts)
    last = (q.mask * torch.arange(q.mask.shape[1])).argmax(1)  # the last real token, whichever side the padding is
    score, idx = q.first[torch.arange(rows), last].softmax(-1).max(-1)
    return [{"text": t, "next_token": q.tokenizer.decode([int(i)]), "token_id": int(i), "score": round(float(s), 6)}
            for t, i, s in zip(q.texts, idx, score)]


def _fills(q: Asked) -> list[dict[str, Any]]:
    from .errors import InputError

    tok, ids = q.tokenizer, q.ids
    assert ids is not None
    if tok.mask_token_id is None:
        raise InputError("this tokenizer has no mask token")
    return [{"text": t, "fills": [tok.decode([int(q.first[r, p].argmax())]) for p in (ids[r] == tok.mask_token_id).nonzero().flatten().tolist()]}
            for r, t in enumerate(q.texts)]


def _token_labels(q: Asked) -> list[dict[str, Any]]:
    tok, ids, mask = q.tokenizer, q.ids, q.mask
    assert ids is not None and mask is not None
    special = set(tok.all_special_ids)
    return [{"text": t, "tokens": [(tok.decode([int(i)]), q.label(q.first[r, p].argmax()))
                                   for p, i in enumerate(ids[r].tolist()) if mask[r, p] and i not in special]}
            for r, t in enumerate(q.texts)]


for _head in (
    Head("encoder", "AutoModel", ("last_hidden_state",), base=True, agreement=ranking_agreement, answer=_embedding,
         mapping="TEXT_ENCODING"),
    Head("classification", "AutoModelForSequenceClassification", architectures=("ForSequenceClassification",),
         labelled=True, agreement=label_agreement, answer=_labels("text"), mapping="SEQUENCE_CLASSIFICATION"),
    Head("token-classification", "AutoModelForTokenClassification", architectures=("ForTokenClassification",),
         labelled=True, agreement=token_agreement, answer=_token_labels, mapping="TOKEN_CLASSIFICATION"),
    Head("question-answering", "AutoModelForQuestionAnswering", ("start_logits", "end_logits"),
         architectures=("ForQuestionAnswering",), per_position=True, agreement=span_agreement,
         no_answer="predict does not take question answering yet (it needs question and context pairs)",
         mapping="QUESTION_ANSWERING"),
    Head("masked-lm", "AutoModelForMaskedLM", architectures=("ForMaskedLM",), agreement=token_agreement, answer=_fills,
         mapping="MASKED_LM"),
    Head("causal-lm", "AutoModelForCausalLM", architectures=("ForCausalLM", "LMHeadModel"), generates=True,
         agreement=token_agreement, answer=_next_token, mapping="CAUSAL_LM"),
    # Four options a row, as SWAG, RACE and HellaSwag have: the model itself takes any number (it
    # scores each option alone), and its logits are [batch, options], one label a row to agree on.
    Head("multiple-choice", "AutoModelForMultipleChoice", architectures=("ForMultipleChoice",), options=4,
         agreement=label_agreement, mapping="MULTIPLE_CHOICE",
         no_answer="predict does not take multiple choice yet (it needs a question and its options)"),
    Head("image-classification", "AutoModelForImageClassification", architectures=("ForImageClassification",), vision=True,
         labelled=True, agreement=label_agreement, answer=_labels("image"), mapping="IMAGE_CLASSIFICATION"),
    Head("semantic-segmentation", "AutoModelForSemanticSegmentation", architectures=("ForSemanticSegmentation",),
         vision=True, labelled=True, agreement=pixel_agreement, answer=_segments, mapping="SEMANTIC_SEGMENTATION"),
    Head("image-encoder", "AutoModel", ("last_hidden_state",), vision=True, base=True, answer=_image_embedding,
         mapping="IMAGE"),
):
    register(_head)
