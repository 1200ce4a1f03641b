"""The generation pipeline: owns the components and runs encode -> prepare -> denoise -> decode.

Contract:
    resolve_model(model, preset=None) -> ModelRef   cheap (headers only): which spec and files a model name means
    Pipeline.load(model=None, *, device=None, text_encoder_device=None, ae_device=None, dtype=None,
                  offload_text_encoder=None, preset=None, quant=None, vram=None, offload=None) -> Pipeline
    Pipeline(spec, transformer, ae, text_encoder, dtype=None)   from built components (tests, training)
    load_text_encoder_only(model=None, *, device=None, dtype=None) -> (spec, text encoder)   for a text-encoder server
    pipe.run(request, limits=None, on_step=None) -> [GenerationResult]   validate, generate, attach the records
    pipe.generate(samples, width, height, steps, guidance) -> [PIL image]

`model` is None (the embedded `fluxrt-shapes`), a preset name (its repo id, looked up in the local Hugging Face
cache only), an `org/name` repo id in that cache, or a local file or folder in any layout `fluxrt.loading` reads.
The text encoder comes from `<folder>/text_encoder` when there is one, else from the spec's text-encoder repo id;
the VAE from the same place as the transformer, else from FLUX.2 [dev]'s repo (one VAE serves every variant).

Stage boundaries are tensors: prompt features (B, T, C), noise latents (B, 128, h, w), reference tokens
(1, L_ref, 128) per sample, decoded images (B, 3, H, W). Each component sits on its own device; the text encoder
can be parked on the CPU between prompts (`offload_text_encoder`). Samples whose references have the same layout
are batched together (`max_batch` at a time); others run in their own batch, so every sample keeps its own
references, and a batch gives the same images as its samples run one by one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
from PIL import Image

from .config import PRESETS, ModelSpec
from .loading.checkpoint import inspect_checkpoint, load_autoencoder, load_transformer
from .loading.errors import CheckpointError, ComponentNotFound
from .loading.hub import is_repo_id, resolve, snapshot_path
from .loading.sources import find_component
from .request import GenerationRequest, GenerationResult, Limits, RequestError, Sample, ValidRequest, validate
from .sampling.latents import noise
from .sampling.references import encode_references, tensor_to_images
from .sampling.run import sample

__all__ = ["ModelRef", "Pipeline", "Sample", "default_device", "embedded_model_path", "load_text_encoder_only",
           "parse_device", "resolve_model"]

EMBEDDED = "fluxrt-shapes"
AE_REPO_ID = "black-forest-labs/FLUX.2-dev"  # the reference downloads the one shared VAE from the dev repo
MAX_BATCH = 8  # samples of one reference layout per forward, unless `max_batch` says otherwise
PROMPT_CACHE_SIZE = 32  # dev features are 512 x 15360 bf16 (15 MB) each: keep the cache bounded


def embedded_model_path() -> Path:
    """The folder of the embedded model's files inside the installed package."""
    return Path(str(files("fluxrt").joinpath("assets", EMBEDDED)))


# ------------------------------------------------------------------------------------------ model resolution
@dataclass(frozen=True)
class ModelRef:
    """What a model name resolved to: its spec and, unless `path` is None, the local files."""

    name: str  # what the caller passed (or the embedded name)
    spec: ModelSpec
    path: Path | None  # None: a preset whose files still have to be found in the hub cache


def _preset(name: str) -> ModelSpec | None:
    return PRESETS.get(name) or next((s for n, s in PRESETS.items() if n.lower() == name.lower()), None)


def _spec_of(path: Path, name: str, preset: str | None) -> ModelSpec:
    """The preset of a local checkpoint: `preset` if given, else the one its headers (and file name) point to."""
    if preset is not None:
        spec = _preset(preset)
        if spec is None:
            raise RequestError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        return spec
    t = inspect_checkpoint(path).components.get("transformer")
    if t is None:
        raise CheckpointError(f"{path}: holds no flow transformer")
    if t.preset is None:  # custom shapes, or siblings of equal shapes (klein / klein base) under a renamed file
        raise CheckpointError(f"{name!r}: transformer shapes ({t.variant}) fit no single preset (candidates: "
                              f"{', '.join(t.presets) or 'none'}); name one with --preset")  # fmt: skip
    return PRESETS[t.preset]


def resolve_model(model: str | None = None, preset: str | None = None) -> ModelRef:
    """Spec and files of a model name (module docstring); reads headers only. Unknown names raise RequestError.

    `preset` names the spec of a local checkpoint whose shapes fit several presets; for a preset name it must agree.
    """
    if model is None:
        model = preset or EMBEDDED
    spec = _preset(str(model))
    if spec is not None:
        if preset is not None and _preset(preset) is not spec:
            raise RequestError(f"preset {preset!r} contradicts model {str(model)!r}")
        path = embedded_model_path() if spec.name == EMBEDDED else None
        return ModelRef(spec.name, spec, path)
    path = Path(model).expanduser()
    if path.exists() or is_repo_id(str(model)):
        local = resolve(model)  # a repo id not in the cache raises, naming the cache folder
        return ModelRef(str(model), _spec_of(local, str(model), preset), local)
    raise RequestError(f"unknown model {str(model)!r}: not a preset ({', '.join(PRESETS)}), an existing file or "
                       f"folder, or an org/name repo id")  # fmt: skip


def _preset_files(spec: ModelSpec) -> Path:
    if spec.repo_id is None:
        raise CheckpointError(f"preset {spec.name!r} has no published weights: build it in code with "
                              f"Pipeline(spec, transformer, ae, text_encoder)")  # fmt: skip
    return snapshot_path(spec.repo_id)  # raises naming the repo id and the cache folder searched


# --------------------------------------------------------------------------------------- component loading
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_device(device) -> torch.device:
    """A torch device from text; None means `default_device()`. Unknown or unavailable devices raise RequestError."""
    if device is None:
        device = default_device()
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RequestError(f"device {device!r} is not a torch device ({e})") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise RequestError(f"device {device!r} is not available: torch sees no CUDA GPU")
    if d.type == "cuda" and d.index is None:  # "cuda" and "cuda:0" must compare equal for the offload default
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32  # CPUs: bf16 matmuls are slow and lossy


def _ae_source(root: Path, spec: ModelSpec) -> Path | str:
    """Where the VAE is: the model's file or folder, the folder around a file, else the preset's own files (the
    embedded model's, for a converted copy of its transformer), else the dev repo in the cache."""
    for candidate in (root, root.parent) if root.is_file() else (root,):
        try:
            find_component(candidate, "vae")
            return candidate
        except ComponentNotFound:
            continue
    return embedded_model_path() if spec.name == EMBEDDED else AE_REPO_ID


def _load_text_encoder(root: Path, spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    from .models.text_encoder import load_text_encoder  # transformers is imported only when a model is loaded

    folder = root if root.is_dir() else root.parent
    if not (folder / "text_encoder").is_dir() and spec.name == EMBEDDED:  # e.g. `fluxrt convert`'s output alone
        folder = embedded_model_path()
    if (folder / "text_encoder").is_dir():
        tok = folder / "tokenizer" if (folder / "tokenizer").is_dir() else None
        return load_text_encoder(folder / "text_encoder", spec.text_encoder, device=device, dtype=dtype,
                                 tokenizer_path=tok)  # fmt: skip
    return load_text_encoder(None, spec.text_encoder, device=device, dtype=dtype)


def load_text_encoder_only(model: str | ModelRef | None = None, *, device=None, dtype: torch.dtype | None = None,
                           preset: str | None = None):  # fmt: skip
    """(spec, text encoder) of a model without its transformer and VAE (`fluxrt serve --text-encoder-only`)."""
    ref = model if isinstance(model, ModelRef) else resolve_model(model, preset)
    root = ref.path if ref.path is not None else _preset_files(ref.spec)
    dev = parse_device(device)
    return ref.spec, _load_text_encoder(root, ref.spec, dev, dtype or _default_dtype(dev))


# ----------------------------------------------------------------------------------------------- pipeline
class Pipeline:
    """The three components of one model and the sampling policy of its spec."""

    plan = None  # the fluxrt.memory Plan it was loaded with, if any

    def __init__(self, spec: ModelSpec, transformer, ae, text_encoder, dtype: torch.dtype | None = None, *,
                 offload_text_encoder: bool = False, text_encoder_device=None, name: str | None = None):  # fmt: skip
        self.spec, self.transformer, self.ae, self.text_encoder = spec, transformer, ae, text_encoder
        self.dtype = dtype or next(transformer.parameters()).dtype
        self.name = name or spec.name
        self.offload_text_encoder = offload_text_encoder
        self.text_encoder_device = torch.device(text_encoder_device) if text_encoder_device else _module_device(
            text_encoder, torch.device("cpu"))  # fmt: skip
        self.prompt_cache_size = PROMPT_CACHE_SIZE
        if offload_text_encoder:
            text_encoder.to("cpu")

    @classmethod
    def load(cls, model: str | ModelRef | None = None, *, device=None, text_encoder_device=None, ae_device=None,
             dtype: torch.dtype | None = None, offload_text_encoder: bool | None = None,
             preset: str | None = None, compile: bool = False, load_text_encoder: bool = True,
             text_encoder_url: str | None = None, text_encoder_token: str | None = None, quant: str | None = None,
             vram: int | str | None = None, offload: str | None = None, plan=None,
             transformer_split=None, step_cache: float | None = None, cuda_graph: bool = False) -> Pipeline:  # fmt: skip
        """Load a model (see the module docstring) with each component on its own device (default: cuda if any).

        dtype: transformer and text encoder compute dtype (default bf16 on a GPU, fp32 on the CPU); the VAE runs
        in fp32 as in the reference. offload_text_encoder: park the text encoder on the CPU between prompts
        (default: only when every component shares one CUDA device). preset: see `resolve_model`.
        compile: torch.compile the transformer's blocks (`fluxrt.accel`; lossless, static shapes). load_text_encoder:
        False leaves `text_encoder` None (parallel ranks > 0 get rank 0's features: `fluxrt.parallel.generate`).
        text_encoder_url: encode prompts on a `fluxrt serve --text-encoder-only` server (`RemoteTextEncoder`;
        token: text_encoder_token, default $FLUXRT_TOKEN) instead of loading the text encoder here.
        quant ("fp8" | "nf4" | "int4", lossy), vram (a budget: bytes or "24GB") and offload ("stream": stream the
        transformer's blocks) go to `fluxrt.memory.plan_memory`, or pass its `plan`; the plan then decides
        formats and placements (text encoder too) and is kept as `pipe.plan`. transformer_split: passed to
        `load_transformer` (tensor-parallel ranks load only their shards: `fluxrt.parallel.tp.sharded_loading`).
        step_cache: a threshold (e.g. 0.1) for `fluxrt.accel.cache` (lossy: later blocks skipped on steps whose
        first block changed less than that since the last full step); None: off. cuda_graph: replay the
        transformer's forward as a CUDA graph (`fluxrt.accel.CUDAGraphStep`; lossless, captured on the first step
        of each image size; CUDA only, not with the step cache or streamed blocks).
        """
        dev = parse_device(device)
        if cuda_graph:
            check_cuda_graph(dev.type, step_cache)
        te_dev = parse_device(text_encoder_device) if text_encoder_device is not None else dev
        ae_dev = parse_device(ae_device) if ae_device is not None else dev
        ref = model if isinstance(model, ModelRef) else resolve_model(model, preset)
        root = ref.path if ref.path is not None else _preset_files(ref.spec)
        if offload_text_encoder is None:
            offload_text_encoder = dev.type == "cuda" and dev == te_dev == ae_dev
        from .memory.apply import apply_plan, load_devices, memory_plan

        plan = memory_plan(ref.spec, dev, dtype or _default_dtype(dev), quant, vram, offload, plan, compile)
        if cuda_graph and plan is not None and plan.streamed:
            raise RequestError(f"--cuda-graph does not combine with streamed blocks (the plan streams "
                               f"{plan.blocks - plan.resident} of {plan.blocks}); raise --vram or drop --offload")  # fmt: skip
        t_dev, te_load_dev = load_devices(plan, dev, te_dev) if plan else (dev, te_dev)
        transformer, _ = load_transformer(root, t_dev, dtype or _default_dtype(dev), ref.spec, transformer_split)
        ae = load_autoencoder(_ae_source(root, ref.spec), ae_dev, torch.float32, ref.spec.autoencoder)
        if text_encoder_url is not None:
            from .service.remote import RemoteTextEncoder  # stdlib HTTP only: no server libraries needed here

            te = RemoteTextEncoder(text_encoder_url, text_encoder_token, expect=ref.spec.text_encoder)
            offload_text_encoder = False
        else:
            te_dtype = dtype or _default_dtype(te_dev)
            te = _load_text_encoder(root, ref.spec, te_load_dev, te_dtype) if load_text_encoder else None
        if plan is not None:  # quantize and place block by block (fluxrt.memory)
            transformer, te, te_dev, offload_text_encoder = apply_plan(plan, transformer, te, dev, te_dev,
                                                                       offload_text_encoder)  # fmt: skip
        if compile:  # last, after any other transform of the transformer (quantized layers compile too)
            from .accel import optimize

            optimize(transformer, compile=True)
        if step_cache is not None:
            from .accel.cache import apply_step_cache

            apply_step_cache(transformer, step_cache)
        if cuda_graph:
            from .accel import CUDAGraphStep

            transformer = CUDAGraphStep(transformer)
        pipe = cls(ref.spec, transformer, ae, te, dtype or _default_dtype(dev), name=ref.name,
                   offload_text_encoder=offload_text_encoder and te is not None, text_encoder_device=te_dev)  # fmt: skip
        pipe.plan = plan
        return pipe

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def ae_device(self) -> torch.device:
        return next(self.ae.parameters()).device

    # ------------------------------------------------------------------------------------------ text
    @property
    def encoder_key(self) -> tuple:
        """What makes two text encoders give the same features: the spec, encoder config and system message."""
        te = self.text_encoder
        return (self.spec.name, getattr(te, "config", None), getattr(te, "system_message", None))

    @property
    def text_encoder(self):
        return self._text_encoder

    @text_encoder.setter
    def text_encoder(self, te) -> None:
        """Swapping the encoder drops cached features: other weights behind the same config give other features."""
        self._text_encoder = te
        self._prompt_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        te = self.text_encoder
        if self.offload_text_encoder:
            te.to(self.text_encoder_device)
        try:
            return te.encode(prompts).detach().to("cpu")
        finally:
            if self.offload_text_encoder:
                te.to("cpu")
                if self.text_encoder_device.type == "cuda":
                    torch.cuda.empty_cache()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, T, C) prompt features on the transformer's device; a cached prompt is never re-encoded."""
        key, cache = self.encoder_key, self._prompt_cache
        todo = [p for p in dict.fromkeys(prompts) if (p, key) not in cache]
        if todo:
            cache.update(((p, key), f) for p, f in zip(todo, self._encode_uncached(todo)))
        for p in prompts:
            cache.move_to_end((p, key))
        feats = torch.stack([cache[(p, key)] for p in prompts])
        while len(cache) > self.prompt_cache_size:  # evict after gathering: this batch may exceed the cache
            cache.popitem(last=False)
        return feats.to(self.device, self.dtype)

    # ------------------------------------------------------------------------------------ sampling
    def _references(self, samples: list[Sample]):
        """Per-sample reference tokens stacked to (B, L_ref, 128) with shared ids, or (None, None)."""
        if not samples[0].refs:
            return None, None
        encoded: dict[int, tuple] = {}  # samples sharing one list of refs (num_images > 1) encode it once
        for s in samples:
            if id(s.refs) not in encoded:
                encoded[id(s.refs)] = encode_references(self.ae, s.refs, self.ae_device, self.dtype)
        toks = [encoded[id(s.refs)][0] for s in samples]
        return torch.cat(toks).to(self.device), encoded[id(samples[0].refs)][1].to(self.device)

    @torch.no_grad()
    def denoise(self, samples: list[Sample], width: int, height: int, steps: int, guidance: float,
                callback: Callable | None = None) -> torch.Tensor:  # fmt: skip
        """Samples sharing one reference layout -> (B, 128, height/16, width/16) denoised latents."""
        mode = "kv" if self.spec.use_kv_cache else self.spec.guidance_mode
        ctx = self.encode_prompts([s.prompt for s in samples])  # (B, T, C)
        neg = self.encode_prompts([s.negative for s in samples]) if mode == "cfg" else None
        x = noise([s.seed for s in samples], height // 16, width // 16, device=self.device, dtype=self.dtype)
        ref, ref_ids = self._references(samples)
        return sample(self.transformer, x, ctx, num_steps=steps, mode=mode, guidance=guidance, neg_ctx=neg,
                      ref=ref, ref_ids=ref_ids, callback=callback)  # fmt: skip

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """(B, 128, h, w) normalised latents -> B uint8 PIL images (the VAE runs in its own device and dtype)."""
        z = latents.to(self.ae_device, next(self.ae.parameters()).dtype)
        return tensor_to_images(self.ae.decode(z))

    def generate(self, samples: list[Sample], width: int, height: int, steps: int, guidance: float,
                 callback: Callable | None = None, max_batch: int = MAX_BATCH) -> list[Image.Image]:  # fmt: skip
        """Images in the order of `samples`; samples are batched by reference layout, `max_batch` at a time.

        callback(step, latent_tokens) runs after every Euler step of every batch. `run_info()` then describes
        this call (the step cache's counts start afresh here).
        """
        if self.step_cache is not None:
            self.step_cache.clear_counts()
        out: list[Image.Image | None] = [None] * len(samples)
        for idx in batches(samples, max_batch):
            group = [samples[i] for i in idx]
            latents = self.denoise(group, width, height, steps, guidance, callback)
            for i, im in zip(idx, self.decode(latents)):
                out[i] = im
        return out

    def run(self, request: GenerationRequest | ValidRequest, limits: Limits | None = None,
            on_step: Callable[[int, int], None] | None = None, max_batch: int = MAX_BATCH,
            ) -> list[GenerationResult]:  # fmt: skip
        """Validate (unless already valid), generate, and pair each image with its metadata record.

        on_step(done, total) is called after every denoising step, total = steps x number of batches.
        """
        valid = request if isinstance(request, ValidRequest) else validate(request, self.spec, limits)
        if valid.spec_name != self.spec.name:
            raise RequestError(f"request validated for {valid.spec_name!r}, this pipeline runs {self.spec.name!r}")
        samples = list(valid.samples)
        total = valid.steps * len(batches(samples, max_batch))
        done = [0]

        def step(i, _img):
            done[0] += 1
            on_step(done[0], total)

        images = self.generate(samples, valid.width, valid.height, valid.steps, valid.guidance,
                               step if on_step else None, max_batch)  # fmt: skip
        run_info = self.run_info()
        return [GenerationResult(im, {**valid.record(i), **run_info}) for i, im in enumerate(images)]

    @property
    def step_cache(self):
        """The transformer's `fluxrt.accel.cache.StepCache` (also through a parallel wrapper), or None."""
        return getattr(self.transformer, "step_cache", None)

    def run_info(self) -> dict:
        """How the last `generate` ran, for the records: dtype, device, and the lossy settings `--from` must
        keep (quantization; the step cache's threshold and how many forwards skipped the later blocks)."""
        info = {"dtype": str(self.dtype).removeprefix("torch."), "device": self.device.type}
        if self.plan is not None and self.plan.quant:
            info["quant"] = self.plan.quant
        cache = self.step_cache
        if cache is not None:
            info |= {"step_cache": cache.threshold, "step_cache_skipped": f"{cache.skipped}/{cache.steps}"}
        return info


def check_cuda_graph(device_type: str, step_cache: float | None) -> None:
    """Refuse --cuda-graph where it cannot run, before anything loads: off CUDA, and with the step cache (which
    decides on the host at every step)."""
    if device_type != "cuda":
        raise RequestError(f"--cuda-graph needs a CUDA GPU; the transformer runs on {device_type}")
    if step_cache is not None:
        raise RequestError(f"--cuda-graph does not combine with --cache {step_cache} (the step cache decides on the "
                           f"host at every step, which a graph replay cannot)")  # fmt: skip


def _module_device(module, default: torch.device) -> torch.device:
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return default


def _layout(s: Sample) -> tuple:
    return tuple(im.size for im in s.refs)


def batches(samples: list[Sample], max_batch: int) -> list[list[int]]:
    """Indices of samples grouped by reference layout, at most `max_batch` per group, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(_layout(s), []).append(i)
    return [g[k : k + max_batch] for g in groups.values() for k in range(0, len(g), max_batch)]
