"""Export a Kiln engine to a Triton Inference Server model repository: <repo>/<name>/config.pbtxt and
<repo>/<name>/<version>/. Which platform serves an engine, and under which file names, is the
engine's backend's answer (Backend.serving).

With `text=True` the repository also answers text: a Python-backend model runs the artifact's
tokenizer (<name>-tokenizer) and an ensemble (<name>-text) chains it to the engine, so a client
sends strings and receives the engine's outputs.

Every config.pbtxt is built as Triton's own ModelConfig protobuf (tritonclient's model_config_pb2)
and printed in its text format, so what is written is what Triton parses. The models are written
into a staging directory inside the repository and installed one by one as engines are
(`store.install`: renamed into place under a lock, an older model of its name moved aside only then).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import backends as registry

from .errors import InputError
from .manifest import Manifest
from .signing import check_signature
from .store import check_artifact, install, require_build

_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
          "int32": "TYPE_INT32", "bool": "TYPE_BOOL", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8"}
_NAME_OK = re.compile(r"[^A-Za-z0-9_.-]+")


def _pb() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise InputError("kiln triton writes Triton's ModelConfig protobuf from tritonclient: "
                         "pip install 'kiln[triton]' (tritonclient[grpc])") from e
    return model_config_pb2


def sanitize(name: str) -> str:
    """A Triton model name: one directory, letters, digits, '_', '-', '.' (accents dropped, anything
    else '_'). A name with nothing left keeps a digest of itself, so two such names never collide."""
    import hashlib
    import unicodedata

    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    clean = _NAME_OK.sub("_", ascii_name).strip("._")
    if not clean.replace("_", "").replace("-", ""):
        clean = f"model-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return clean


def _instance_group(pb: Any, meta: Manifest) -> Any:
    """One instance on the device the engine was built for: GPU 0 for a CUDA engine, else the CPU."""
    gpu = str(meta.device.get("type", "cpu")).startswith("cuda")
    group = pb.ModelInstanceGroup(count=1, kind=pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU)
    if gpu:
        group.gpus.append(0)
    return group


def _tensors(meta: Manifest) -> tuple[list[tuple[str, str, str, list[Any]]], bool]:
    tensors = [("input", n, s["dtype"], list(s["dims"])) for n, s in meta.inputs.items()]
    tensors += [("output", n, s.get("dtype", "float32"), list(s["dims"])) for n, s in meta.outputs.items()]
    batched = all(dims and dims[0] == "batch" for _, _, _, dims in tensors)
    return tensors, batched


def _max_batch(meta: Manifest, batched: bool) -> int:
    if not batched:
        return 0
    limit = int(meta.axis_ranges["batch"][1])
    serving = registry.get(meta.backend).serving(meta)
    return min(limit, serving.max_batch) if serving is not None and serving.max_batch is not None else limit


def model_config(name: str, meta: Manifest) -> Any:
    """Triton's model configuration of the engine, as a ModelConfig protobuf. With a leading batch
    axis everywhere, max_batch_size is the engine's batch limit and dims leave the batch out; any
    other dynamic dim is -1."""
    pb = _pb()
    serving = registry.get(meta.backend).serving(meta)
    if serving is None:
        raise InputError(f"a {meta.backend!r} engine has no Triton backend")
    tensors, batched = _tensors(meta)
    cfg = pb.ModelConfig(name=name, max_batch_size=_max_batch(meta, batched), **{serving.field: serving.platform})
    for kind, n, dtype, dims in tensors:
        shown = dims[1:] if batched else dims
        entry = (cfg.input if kind == "input" else cfg.output).add()
        entry.name, entry.data_type = n, pb.DataType.Value(_TYPES[dtype])
        entry.dims.extend(-1 if isinstance(x, str) else int(x) for x in shown)
    if batched:
        cfg.dynamic_batching.SetInParent()
    cfg.instance_group.append(_instance_group(pb, meta))
    return cfg


def config_pbtxt(name: str, meta: Manifest) -> str:
    return _text(model_config(name, meta))


def _text(cfg: Any) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def _text_configs(name: str, meta: Manifest, engine_cfg: Any) -> tuple[Any, Any]:
    """The tokenizer's Python-backend model and the ensemble that feeds its ids to the engine."""
    pb = _pb()
    if set(meta.inputs) != {"input_ids", "attention_mask"}:
        raise InputError(f"--text needs an engine that takes input_ids and attention_mask; this one takes {', '.join(meta.inputs)}")
    if len(meta.inputs["input_ids"].get("dims", ())) != 2:  # the tokenizer model makes one sequence a row
        raise InputError(f"--text makes one sequence a row; this engine takes input_ids {tuple(meta.inputs['input_ids']['dims'])}")
    batch = engine_cfg.max_batch_size
    lo_s, hi_s = meta.axis_ranges.get("seq", (1, 512))
    tok = pb.ModelConfig(name=f"{name}-tokenizer", backend="python", max_batch_size=batch)
    text_in = tok.input.add()
    text_in.name, text_in.data_type = "TEXT", pb.TYPE_STRING
    text_in.dims.append(1)
    for n in ("input_ids", "attention_mask"):
        out = tok.output.add()
        out.name, out.data_type = n, pb.TYPE_INT64
        out.dims.append(-1)
    for key, value in (("min_seq", lo_s), ("max_seq", hi_s), ("task", meta.model.task if meta.model else "encoder")):
        tok.parameters[key].string_value = str(value)
    tok.instance_group.append(pb.ModelInstanceGroup(count=1, kind=pb.ModelInstanceGroup.KIND_CPU))

    ens = pb.ModelConfig(name=f"{name}-text", platform="ensemble", max_batch_size=batch)
    ens_in = ens.input.add()
    ens_in.CopyFrom(text_in)
    for o in engine_cfg.output:
        ens.output.add().CopyFrom(o)
    step = ens.ensemble_scheduling.step.add(model_name=tok.name, model_version=-1)
    step.input_map["TEXT"] = "TEXT"
    step.output_map.update({"input_ids": "_input_ids", "attention_mask": "_attention_mask"})
    step = ens.ensemble_scheduling.step.add(model_name=name, model_version=-1)
    step.input_map.update({"input_ids": "_input_ids", "attention_mask": "_attention_mask"})
    step.output_map.update({o.name: o.name for o in engine_cfg.output})
    return tok, ens


# The tokenizer model Triton's Python backend runs; it needs transformers and numpy where Triton runs.
TOKENIZER_MODEL = '''"""Kiln: text -> (input_ids, attention_mask) with the engine's own tokenizer (files beside this one)."""
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        self.tok = AutoTokenizer.from_pretrained(here, local_files_only=True)
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        self.min_seq, self.max_seq = int(params["min_seq"]), int(params["max_seq"])
        if self.tok.pad_token is None and self.tok.eos_token is not None:
            self.tok.pad_token = self.tok.eos_token  # GPT-style tokenizers: the mask hides it

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]
            enc = self.tok(texts, padding="longest", truncation=True, max_length=self.max_seq, return_tensors="np")
            ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
            short = self.min_seq - ids.shape[1]
            if short > 0:  # the engine's shortest sequence: pad, masked out
                left = self.tok.padding_side == "left"
                widths = ((0, 0), (short, 0) if left else (0, short))
                ids = np.pad(ids, widths, constant_values=self.tok.pad_token_id or 0)
                mask = np.pad(mask, widths, constant_values=0)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]))
        return responses
'''


def export_triton(artifact: str | Path, repo: str | Path, name: str | None = None, version: int = 1,
                  text: bool = False, allow_failed: bool = False, public_key: str | Path | None = None) -> Path:
    """The engine as a Triton model (and, with `text`, its tokenizer model and the ensemble), under
    `repo`; returns the engine model's directory. Nothing in `repo` changes unless every model was
    written whole. Like `load`: with `public_key` the signature is checked first, and an engine
    whose build verdict is not a pass is refused unless `allow_failed`."""
    artifact = Path(artifact)
    if public_key is not None:
        check_signature(artifact, public_key)
    meta = check_artifact(artifact)
    if meta.mode != "generate":
        require_build(artifact, meta, "kiln triton")
    if meta.status != "pass" and not allow_failed:
        raise InputError(f"{artifact}: its build verdict is {meta.status!r} ({meta.verdict.reason if meta.verdict else ''}); "
                         f"a server would answer with it: export it anyway with --allow-failed")
    if meta.mode == "generate":
        raise InputError(f"{artifact} is a generation artifact: serving its prefill and decode steps needs a decode loop "
                         f"around them, which Kiln does not write for Triton; export a forward engine")
    serving = registry.get(meta.backend).serving(meta)
    if serving is None:
        servable = [n for n in registry.names() if registry.get(n).serving_platform]
        raise InputError(f"a {meta.backend!r} engine has no Triton backend here (Triton's PyTorch backend takes "
                         f"TorchScript, which Kiln does not produce). Export one of: {', '.join(servable)}")
    if not isinstance(version, int) or version < 1:
        raise InputError(f"--version {version!r}: Triton model versions are positive integers")
    name = sanitize(name or f"{meta.model.name if meta.model else 'model'}-{meta.backend}-{meta.precision}")
    tokenizer_files = list(meta.tokenizer)
    if text and not tokenizer_files:
        raise InputError(f"{artifact} carries no tokenizer, so the repository cannot take text: build the engine with "
                         f"kiln build from a model with a tokenizer, or export without --text")
    engine_cfg = model_config(name, meta)
    models: dict[str, tuple[Any, dict[str, Path | str]]] = {
        name: (engine_cfg, {dst: artifact / src for src, dst in serving.files.items() if (artifact / src).is_file()})}
    if text:
        tok_cfg, ens_cfg = _text_configs(name, meta, engine_cfg)
        models[tok_cfg.name] = (tok_cfg, {"model.py": TOKENIZER_MODEL, **{f: artifact / f for f in tokenizer_files}})
        models[ens_cfg.name] = (ens_cfg, {})  # an ensemble has an empty version directory
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".kiln-staging-", dir=repo))
    try:
        for model_name, (cfg, files) in models.items():
            kept = repo / model_name
            if kept.is_dir():  # other versions already there stay: only this version and the config change
                shutil.copytree(kept, staging / model_name, symlinks=True,
                                ignore=lambda d, names: [str(version), "config.pbtxt"] if Path(d) == kept else [])
            vdir = staging / model_name / str(version)
            vdir.mkdir(parents=True)
            for dst, src in files.items():
                if isinstance(src, Path):
                    shutil.copy2(src, vdir / dst)
                else:
                    (vdir / dst).write_text(src)
            (staging / model_name / "config.pbtxt").write_text(_text(cfg))
        for model_name in models:
            install(staging / model_name, repo / model_name)  # Triton lists subdirectories only: its lock file is ignored
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return repo / name

