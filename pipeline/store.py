"""The deploy verbs over the on-disk format (`manifest`): load, verify, install, recover, for a
forward engine and for a generation artifact (two step engines and the cache they share).

A directory is staged under a hidden name and installed whole, so an interrupted build leaves
nothing that a load accepts. Loading checks the manifest, every hash and the library versions
before a backend opens anything (a .so or .pt2 runs code when loaded).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import backends as registry
from backends.base import CompiledModel

from . import manifest as fmt
from .compare import Comparator, Comparison
from .choices import DEFAULTS
from .errors import ArtifactError, InputError
from .fsutil import exchange, left_by_dead, lock
from .manifest import Manifest
from .decoding import AGREEMENT_MARGIN, CacheSpec, Generation, agreement, greedy
from .generate import MODE, STEPS
from .precision import Precision, Tolerance
from .signing import check_signature

REFERENCE = "reference.pt"  # a build's input batches and eager outputs, for verify


def require_build(directory: Path, meta: Manifest, verb: str) -> None:
    """What `verb` needs is an artifact `kiln build` installed, not an engine `kiln run --save-engines` left."""
    if not meta.built or not (directory / REFERENCE).is_file():
        raise ArtifactError(f"{directory} is an engine `kiln run --save-engines` left: no build verdict, model or reference "
                            f"inputs, which {verb} needs; build an artifact with kiln build --backends {meta.backend} "
                            f"--precisions {meta.precision}")


def check_artifact(directory: str | Path) -> Manifest:
    """The manifest, once every listed file matches its hash and the libraries match."""
    directory = Path(directory)
    meta = fmt.read(directory)
    fmt.check_files(directory, meta)
    fmt.check_requires(directory, meta, registry.get(meta.backend).pinned())
    return meta


def load(directory: str | Path, device: str | None = None, allow_failed: bool = False,
         public_key: str | Path | None = None) -> CompiledModel:
    """An engine from its directory, checked first; needs none of the model's code. With
    `public_key`, its signature is checked before anything else. An engine whose recorded verdict
    is not a pass is refused unless `allow_failed`."""
    if public_key is not None:
        check_signature(directory, public_key)
    meta = fmt.read(directory)
    if meta.mode == "generate":
        raise ArtifactError(f"{directory} is a generation artifact (prefill and decode steps): load it with "
                            f"pipeline.load_generation, answer with kiln predict")
    if meta.status != "pass" and not allow_failed:
        raise ArtifactError(f"{directory}: its build verdict is {meta.status!r} ({meta.verdict.reason if meta.verdict else ''}); "
                            f"load it anyway with allow_failed=True (kiln load --allow-failed)")
    return registry.get(meta.backend).load(directory, device)


def is_current(directory: Path, cache_key: str) -> bool:
    """A whole, verified engine that passed at every shape, built from the same inputs (same cache key): safe to reuse."""
    with lock(directory):
        recover(directory)
    try:
        meta = check_artifact(directory)
    except ArtifactError:
        return False
    return meta.cache_key == cache_key and meta.verdict is not None and meta.verdict.passed


def recover(target: Path) -> None:
    """A kill between install's two renames leaves the target missing and the previous engine moved
    aside by a process that no longer runs: put it back (or drop it, if a newer one is in place)."""
    for old in sorted(target.parent.glob(f".old-*-{target.name}")):
        if not left_by_dead(old, ".old-"):
            continue
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)


def install(src: Path, target: Path) -> None:
    """Put a complete engine directory in place of `target`: swapped with the older one in one step
    where the file system can (a reader finds the old engine or the new, never none), else the
    older one moved aside first and removed after. Installs into one target take turns; a kill
    between those two renames is undone by `recover`."""
    with lock(target):
        recover(target)
        if target.exists() and exchange(src, target):
            shutil.rmtree(src, ignore_errors=True)  # the older engine, now under the staging name
            return
        old = None
        if target.exists():
            old = target.with_name(f".old-{os.getpid()}-{target.name}")
            os.replace(target, old)
        os.replace(src, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_reference(directory: Path, shapes: dict[str, tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]],
                    task: list[bool] | None = None) -> Path:
    """Every built shape's input batches and eager fp32 outputs, for `kiln verify`; `task`: which
    batches count for task agreement (References.judge's choice), the same at every shape."""
    path = directory / REFERENCE
    data: dict[str, Any] = {"shapes": {s: {"inputs": i, "outputs": o} for s, (i, o) in shapes.items()}}
    if task is not None:
        data["task"] = [bool(t) for t in task]
    torch.save(data, path)
    return path


def save_preprocessor(bundle: Any, directory: Path) -> dict[str, Any]:
    """The model's tokenizer (text) or image processor (images) files beside the engine's, hashed
    with them: the manifest's field ("tokenizer" or "processor") and its files; {} without one."""
    key, pre = ("processor", bundle.processor) if bundle.vision else ("tokenizer", bundle.tokenizer)
    if pre is None:
        return {}
    before = {p.name for p in directory.iterdir()}
    pre.save_pretrained(directory)
    added = sorted(p.name for p in directory.iterdir() if p.name not in before)
    for name in added:
        if not (directory / name).is_file():
            raise ArtifactError(f"the {key} wrote {name}, not a file: an engine directory holds files only")
    return {key: tuple(added)}


def read_reference(directory: str | Path) -> dict[str, dict[str, list[dict[str, torch.Tensor]]]]:
    """{shape: {"inputs": [...], "outputs": [...]}}."""
    return read_reference_file(Path(directory))["shapes"]


def read_reference_file(directory: Path) -> dict[str, Any]:
    try:
        data = torch.load(directory / REFERENCE, weights_only=True)  # tensors only; hashed before this
    except Exception as e:  # a crafted pickle is refused by weights_only: say so, in one line
        raise ArtifactError(f"{directory / REFERENCE} is not a Kiln reference file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), dict):
        raise ArtifactError(f"{directory / REFERENCE} is not a Kiln reference file")
    return data


@dataclass
class Verification:
    """An engine checked again at every shape it was built for, each under the tolerances applied then."""

    shapes: dict[str, Comparison]

    @property
    def passed(self) -> bool:
        return bool(self.shapes) and all(c.passed for c in self.shapes.values())

    def __bool__(self) -> bool:
        return self.passed

    @property
    def batches(self) -> int:
        return sum(c.batches for c in self.shapes.values())

    @property
    def reason(self) -> str:
        shown = [(s, c) for s, c in self.shapes.items() if not c.passed] or list(self.shapes.items())
        return "; ".join(f"at {s}: {c.reason}" for s, c in shown)


def verify(directory: str | Path, device: str | None = None, public_key: str | Path | None = None) -> Verification:
    """Reload the engine and compare it again with the eager outputs stored at build, at every
    recorded shape, under the tolerances applied at that shape."""
    directory = Path(directory)
    model = load(directory, device, allow_failed=True, public_key=public_key)
    meta = fmt.read(directory)
    recorded = meta.verdict.shapes if meta.verdict and meta.model else {}
    if not recorded:
        raise ArtifactError(f"{directory} records no verdict to verify against (saved by kiln run, not built by kiln build)")
    ref = read_reference(directory)
    task = read_reference_file(directory).get("task")
    out: dict[str, Comparison] = {}
    for shape, verdict in recorded.items():
        if shape not in ref:
            raise ArtifactError(f"{directory / REFERENCE} holds no batches for the recorded shape {shape}")
        tol = {o: Tolerance.from_dict(t) for o, t in verdict["tolerances"].items()}
        comp = Comparator(meta.precision, meta.model.task if meta.model else "", tol)
        for i, (x, y) in enumerate(zip(ref[shape]["inputs"], ref[shape]["outputs"])):
            out_t = model({k: v.to(model.device) for k, v in x.items()})
            comp.add(out_t, y, y, None, x.get("attention_mask"), task=task[i] if task and i < len(task) else True)
        out[shape] = comp.result()
    return Verification(out)


# Generation artifacts (kiln build --mode generate): two step engines and the cache they share.

def is_generation(directory: str | Path) -> bool:
    """Whether `directory` holds a generation artifact (its manifest says mode "generate")."""
    try:
        return fmt.read(directory).mode == MODE
    except ArtifactError:
        return False


@dataclass
class GenerationArtifact:
    """A built generation engine, loaded: `generate(prompt_ids, n)` greedy tokens, `generate_text`
    answers with the tokenizer it carries."""

    directory: Path
    meta: Manifest
    prefill: Any  # CompiledModel
    decode: Any
    spec: CacheSpec
    tokenizer: Any = None

    @property
    def device(self) -> str:
        return str(self.prefill.device)

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> Generation:
        """Greedy tokens after `prompt` [batch, S]; every call passes the engines' door checks."""
        return greedy(self.prefill, self.decode, self.spec, prompt.to(self.device), new_tokens,
                      sync=self.decode.synchronize)

    def generate_text(self, texts: Sequence[str], new_tokens: int = DEFAULTS["predict"].new_tokens) -> list[dict[str, Any]]:
        """One continuation per prompt (each generated alone: the steps take no padding mask), cut at
        the end-of-text token. A prompt longer than the cache leaves room for is cut from the left,
        and the answer says so."""
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("predict takes a list of one or more strings")
        if self.tokenizer is None:
            raise ArtifactError(f"{self.directory} carries no tokenizer: generate from token ids with GenerationArtifact.generate")
        if not 1 <= new_tokens < self.spec.max_len:
            raise InputError(f"--new-tokens {new_tokens}: the static cache holds {self.spec.max_len} positions; "
                             f"generate 1 to {self.spec.max_len - 1}")
        room = self.spec.max_len - new_tokens
        eos = self.meta.generation.get("eos_token_id")
        lo_b = int(self.meta.generation["batch"][0])
        out = []
        for text in texts:
            ids = self.tokenizer(text, return_tensors="pt")["input_ids"].to(torch.int64)
            if ids.shape[1] == 0:
                raise InputError("an empty prompt: a generation needs at least one token to start from")
            answer: dict[str, Any] = {"text": text}
            if ids.shape[1] > room:
                answer["truncated"] = {"tokens": int(ids.shape[1]), "kept": room}
                ids = ids[:, -room:]
            g = self.generate(ids.expand(lo_b, -1) if lo_b > 1 else ids, new_tokens)
            if not all(bool(torch.isfinite(x).all()) for x in g.step_logits):
                raise ArtifactError("the engine returned NaN or Inf logits: no answer is better than a wrong one")
            tokens = g.tokens[0].tolist()
            if eos is not None and eos in tokens:
                tokens = tokens[:tokens.index(eos)]
            answer.update(generated=self.tokenizer.decode(tokens), token_ids=tokens)
            out.append(answer)
        return out


def load_generation(directory: str | Path, device: str | None = None, allow_failed: bool = False,
                    public_key: str | Path | None = None) -> GenerationArtifact:
    """A generation artifact, checked (signature when a key is given, manifest, every file's
    hash, library versions) before either step is opened."""
    directory = Path(directory)
    if public_key is not None:
        check_signature(directory, public_key)
    meta = fmt.read(directory)
    if meta.mode != MODE:
        raise ArtifactError(f"{directory} is a forward engine, not a generation artifact: load it with kiln load")
    if meta.status != "pass" and not allow_failed:
        raise ArtifactError(f"{directory}: its build verdict is {meta.status!r}; load it anyway with allow_failed=True")
    fmt.check_files(directory, meta)
    backend = registry.get(meta.backend)
    fmt.check_requires(directory, meta, backend.pinned())
    gen = meta.generation
    cache = gen["cache"]
    dtype = getattr(torch, str(cache["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"{directory}: unknown cache dtype {cache['dtype']!r}")
    spec = CacheSpec(int(cache["layers"]), int(cache["heads"]), int(cache["head_dim"]), int(cache["max_len"]), dtype)
    for kind in STEPS:  # each step is a directory of this artifact, named by the manifest: never a path out of it
        step = gen["steps"].get(kind) if isinstance(gen.get("steps"), dict) else None
        if not isinstance(step, str) or step in ("", ".", "..") or "/" in step or "\\" in step:
            raise ArtifactError(f"{directory}: the manifest's {kind} step {step!r} is not a directory inside the artifact")
    prefill, decode = (backend.load(directory / gen["steps"][kind], device) for kind in STEPS)
    tokenizer = None
    if meta.tokenizer:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    return GenerationArtifact(directory, meta, prefill, decode, spec, tokenizer)


@dataclass
class GenerationCheck:
    """A generation artifact re-run on its build's prompts, per shape: tokens against eager fp32's."""

    shapes: dict[str, dict[str, Any]]
    precision: Precision

    @property
    def passed(self) -> bool:
        return bool(self.shapes) and all(v["passed"] for v in self.shapes.values())

    @property
    def reason(self) -> str:
        return "; ".join(f"at {s}: {v['reason']}" for s, v in self.shapes.items())


def verify_generation(directory: str | Path, device: str | None = None, public_key: str | Path | None = None) -> GenerationCheck:
    """Load the artifact and generate again from every built shape's prompts: at fp32 the tokens
    must be eager fp32's; below, agreement at least what the build recorded, less the margin."""
    art = load_generation(directory, device, allow_failed=True, public_key=public_key)
    data = read_reference_file(art.directory)
    recorded = art.meta.verdict.shapes if art.meta.verdict else {}
    precision = art.meta.precision
    out = {}
    for s, ref in data["shapes"].items():
        got = art.generate(ref["prompt"], int(data["new_tokens"]))
        a = agreement(Generation(ref["tokens"], [], 0.0, []), dataclasses.replace(got, step_logits=[]))
        floor = 1.0 if precision == Precision.FP32 else float(recorded.get(s, {}).get("agreement") or 0.0) - AGREEMENT_MARGIN
        ok = a.agreement >= floor and all(bool(torch.isfinite(x).all()) for x in got.step_logits)
        out[s] = {"passed": ok, "agreement": a.agreement, "first_divergence": a.first_divergence,
                  "reason": (f"{a.agreement:.0%} of {ref['tokens'].numel()} tokens as eager fp32's"
                             + (f", first divergence at step {a.first_divergence}" if a.first_divergence is not None else ""))}
    return GenerationCheck(out, precision)
