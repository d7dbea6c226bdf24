"""Images out of the joint space: any weighted mix of media -> ImageBind embedding -> Stable unCLIP.

The official recipe (``imagebind_LLM/image_generate.py``):

1. each modality's ImageBind embedding **before** normalisation (the head output, clip-averaged), point
   clouds divided by 5 (``POINT_SCALE``);
2. mixed with the request's weights, normalised as for the LLM: ``sum_i w_i / (sum_j w_j + 1e-6) * e_i``;
3. with a retrieval cache: ``s = |e|``, ``e = s * blend(e / s)`` (the cache blend of the LLM path, the
   norm restored afterwards);
4. given as ``image_embeds`` to diffusers' ``StableUnCLIPImg2ImgPipeline``
   (``stabilityai/stable-diffusion-2-1-unclip``, conditioned on OpenCLIP ViT-H/14 image embeddings, the
   space of ImageBind-huge's vision and text towers: 1024-d) with the user's prompt, ``noise_level=0``.
   Under classifier-free guidance the pipeline uses zeros as the negative image embedding.

`image_embedding` does 1-3 with an `Engine`'s encoder and cache; `UnCLIP` loads the pipeline (from a folder
or downloaded into the weights cache with resume) and does 4. diffusers is the optional extra ``images``.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import torch

from imagebind_llm.engine import Engine, Request, modality, weighted_sum
from imagebind_llm.hub import default_cache_dir

DEFAULT_PIPELINE = "stabilityai/stable-diffusion-2-1-unclip"
POINT_SCALE = 5.0  # official ``point_scale``: point embeddings are divided by it before the mix
INSTALL_HINT = "pip install 'imagebind-llm[images]'"
# What the pipeline needs when `image_embeds` are given: no image encoder, no feature extractor, no single-file
# checkpoint; full-precision safetensors (cast at load time).
ALLOW_PATTERNS = ["model_index.json", "*.json", "tokenizer/*", "*.safetensors", "image_normalizer/*"]
IGNORE_PATTERNS = ["image_encoder/*", "feature_extractor/*", "*.ckpt", "*.fp16.*", "*.msgpack", "*.onnx*"]


class PipelineMissingError(OSError):
    """diffusers is not installed, or the unCLIP pipeline's files are not here and cannot be downloaded."""


def download_command(repo: str = DEFAULT_PIPELINE, target: str | os.PathLike | None = None) -> str:
    """The shell line that downloads the pipeline's needed files (what `resolve_pipeline` fetches)."""
    target = target or default_cache_dir() / repo.rsplit("/", 1)[-1]
    includes = " ".join(f"--include '{p}'" for p in ALLOW_PATTERNS)
    excludes = " ".join(f"--exclude '{p}'" for p in IGNORE_PATTERNS)
    return f"hf download {repo} {includes} {excludes} --local-dir {target}"


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:
        raise PipelineMissingError(f"image generation needs diffusers ({e}): {INSTALL_HINT}") from None
    return diffusers


# ---------------------------------------------------------------- 1-3: media -> the image embedding
def prenorm_mix(engine: Engine, request: Request, *, point_scale: float = POINT_SCALE) -> torch.Tensor:
    """The official image-generation mix ``[1, D]`` of ``request``'s media: per-modality ImageBind embeddings
    before normalisation (points divided by ``point_scale``), mixed by the request's weights.

    Raises:
        ValueError: no media, precomputed features only, all weights 0, or a model without an encoder.
    """
    if not (math.isfinite(point_scale) and point_scale > 0):
        raise ValueError(f"point_scale must be a finite number > 0, got {point_scale!r}")
    encoder = engine.model.encoder
    if encoder is None:
        raise ValueError("this model has no ImageBind encoder, so it cannot turn media into images; build it with one "
                         "(--imagebind or --name)")
    media = request.media()  # all weights 0: refused here
    if media is None:
        if request.features is not None:
            raise ValueError("image generation needs the media themselves: precomputed features are the normalised "
                             "mix, not the embedding before normalisation that unCLIP takes")
        raise ValueError("no media: give at least one input (--image, --audio, --video, --text, --point, ...)")
    embeddings = {}
    with engine.lock, torch.inference_mode():
        for name, (x, _) in media.items():
            tower = modality(name).tower
            try:
                _, prenorm = encoder({tower: x}, return_prenorm=True)
            except TypeError:
                raise ValueError(f"the model's encoder ({type(encoder).__name__}) cannot give embeddings before "
                                 "normalisation (return_prenorm)") from None
            embeddings[name] = prenorm[tower].float() / (point_scale if tower == "point" else 1.0)
    return weighted_sum(embeddings, {name: w for name, (_, w) in media.items()})


def blend_prenorm(features: torch.Tensor, cache: Any, options: Any = None) -> torch.Tensor:
    """The official cache step of image generation: ``s * cache.blend(features / s)`` with ``s = |features|``
    per row (the blend's output is unit-norm; the norm is restored)."""
    norm = features.norm(dim=-1, keepdim=True)
    blended = cache.blend(features / norm.clamp_min(1e-12), options=options)
    return blended.to(features.device, features.dtype) * norm


def image_embedding(engine: Engine, request: Request, *, point_scale: float = POINT_SCALE,
                    use_cache: bool = True) -> torch.Tensor:
    """``request``'s media -> the ``image_embeds`` ``[1, D]`` of the official image generation: `prenorm_mix`,
    then, when the engine has a retrieval cache (and ``use_cache``), `blend_prenorm` with ``request.blend``."""
    features = prenorm_mix(engine, request, point_scale=point_scale)
    if use_cache and engine.cache is not None:
        with engine.lock:
            features = blend_prenorm(features, engine.cache, request.blend)
    return features


# ---------------------------------------------------------------- 4: the pipeline
def resolve_pipeline(source: str | os.PathLike = DEFAULT_PIPELINE, *, cache_dir: str | os.PathLike | None = None,
                     download: bool = True) -> Path:
    """A local folder of the pipeline: ``source`` itself when it is one, else the Hugging Face repo ``source``
    downloaded (needed files only, resumed when interrupted) into ``<cache>/<repo name>``.

    Raises:
        PipelineMissingError: not a pipeline folder, and not downloadable (offline, ``download=False``).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise PipelineMissingError(f"{path} is not a diffusers pipeline folder (no model_index.json); download "
                                       f"one with: {download_command(DEFAULT_PIPELINE, path)}")
        return path
    repo = str(source)
    if repo.count("/") != 1 or path.exists():
        raise PipelineMissingError(f"{source}: no such pipeline folder, and not a Hugging Face repo id like "
                                   f"{DEFAULT_PIPELINE}")
    target = Path(cache_dir or default_cache_dir()) / repo.rsplit("/", 1)[-1]
    done = target / ".complete"
    if done.is_file() or (not download and (target / "model_index.json").is_file()):  # ours, or `hf download`'s
        return target
    if not download:
        raise PipelineMissingError(f"the unCLIP pipeline {repo} is not in {target}; download it with: "
                                   f"{download_command(repo, target)}")
    _diffusers()  # the extra first: huggingface_hub comes with it
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id=repo, local_dir=target, allow_patterns=ALLOW_PATTERNS,
                          ignore_patterns=IGNORE_PATTERNS)
    except Exception as e:  # offline, gated, interrupted: partial files stay and the next run resumes
        raise PipelineMissingError(f"downloading the unCLIP pipeline {repo} into {target} failed ({type(e).__name__}: "
                                   f"{e}); run again to resume, or download it with: "
                                   f"{download_command(repo, target)} and pass --unclip {target}") from None
    done.write_text(repo + "\n")
    return target


def load_pipeline(source: str | os.PathLike = DEFAULT_PIPELINE, *, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None,
                  download: bool = True) -> Any:
    """``StableUnCLIPImg2ImgPipeline`` from `resolve_pipeline`, without its image encoder (embeddings are given)."""
    diffusers = _diffusers()
    path = resolve_pipeline(source, cache_dir=cache_dir, download=download)
    try:
        pipe = diffusers.StableUnCLIPImg2ImgPipeline.from_pretrained(path, dtype=dtype, image_encoder=None,
                                                                     feature_extractor=None)
    except (OSError, ValueError, KeyError) as e:
        raise PipelineMissingError(f"{path} does not hold a complete StableUnCLIPImg2ImgPipeline ({e}); download "
                                   f"it again with: {download_command(DEFAULT_PIPELINE, path)}") from None
    pipe.set_progress_bar_config(disable=True)
    return _with_encoder_stub(pipe.to(device))


class _NoImageEncoder(torch.nn.Module):
    """Stands for the pipeline's CLIP image encoder when it is not loaded (the embeddings are given): diffusers
    reads the encoder's dtype even then."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.placeholder = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)

    @property
    def device(self) -> torch.device:  # diffusers asks every component
        return self.placeholder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.placeholder.dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("this unCLIP pipeline was loaded without its image encoder: give image_embeds")


def _with_encoder_stub(pipe: Any) -> Any:
    if getattr(pipe, "image_encoder", None) is None:
        pipe.image_encoder = _NoImageEncoder(pipe.unet.dtype).to(pipe.unet.device)
    return pipe


class UnCLIP:
    """Stable unCLIP image generation from ImageBind embeddings.

    Args:
        source: a loaded pipeline, a pipeline folder, or a Hugging Face repo id (downloaded on first use into
            the weights cache; default ``stabilityai/stable-diffusion-2-1-unclip``). Loading is lazy.
        dtype: parameter dtype when loading (float16 on a GPU halves the memory).
        device: torch device when loading.
        cache_dir: where a repo id is downloaded (default: the weights cache, ``$IMAGEBIND_LLM_CACHE``).
        download: allow downloading a repo id.
    """

    def __init__(self, source: Any = DEFAULT_PIPELINE, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None,
                 download: bool = True) -> None:
        loaded = not isinstance(source, (str, os.PathLike))
        self._pipe = _with_encoder_stub(source) if loaded else None
        self.source = (getattr(source, "name_or_path", None) or type(source).__name__) if loaded else str(source)
        self.dtype, self.device, self.cache_dir, self.download = dtype, device, cache_dir, download
        self._loading = threading.Lock()
        self.lock = threading.Lock()  # one generation at a time

    @property
    def pipeline(self) -> Any:
        if self._pipe is None:
            with self._loading:
                if self._pipe is None:
                    self._pipe = load_pipeline(self.source, dtype=self.dtype, device=self.device,
                                               cache_dir=self.cache_dir, download=self.download)
        return self._pipe

    @property
    def embedding_dim(self) -> int:
        """The width of the image embeddings the pipeline takes (1024 for SD-2.1-unCLIP, OpenCLIP ViT-H)."""
        return int(self.pipeline.image_normalizer.mean.shape[-1])

    def check(self, image_embeds: torch.Tensor) -> None:
        """``image_embeds`` must be ``[B, embedding_dim]`` and finite.

        Raises:
            ValueError: naming both widths and which pipeline matches ImageBind-huge.
        """
        if image_embeds.ndim != 2:
            raise ValueError(f"image_embeds must be [batch, dim], got shape {list(image_embeds.shape)}")
        width = self.embedding_dim
        if image_embeds.shape[-1] != width:
            raise ValueError(f"the ImageBind embedding is {image_embeds.shape[-1]}-d but the unCLIP pipeline "
                             f"({self.source}) takes {width}-d image embeddings: ImageBind-huge's space is OpenCLIP "
                             f"ViT-H's (1024-d), which {DEFAULT_PIPELINE} uses (the '-small' variant is ViT-L, "
                             "768-d, and does not fit)")
        if not torch.isfinite(image_embeds).all():
            raise ValueError("image_embeds hold NaN or infinite values")

    def generate(self, image_embeds: torch.Tensor, prompt: str = "", *, negative_prompt: str | None = None,
                 seed: int | None = None, num_inference_steps: int = 20, guidance_scale: float = 10.0,
                 noise_level: int = 0, height: int | None = None, width: int | None = None,
                 num_images: int = 1) -> list[Any]:
        """PIL images of ``image_embeds`` ``[1, D]`` (the official call: ``pipe(prompt, image_embeds=...)`` with
        diffusers' defaults, 20 steps, guidance 10, noise level 0); the same ``seed`` gives the same images.

        Raises:
            ValueError: a bad option or embedding width (`check`).
        """
        pipe = self.pipeline
        self.check(image_embeds)
        levels = int(pipe.image_noising_scheduler.config.num_train_timesteps)
        if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level < levels:
            raise ValueError(f"noise_level must be a whole number in [0, {levels}), got {noise_level!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a whole number >= 1, got {num_inference_steps!r}")
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= 16:
            raise ValueError(f"num_images must be in 1..16, got {num_images!r}")
        multiple = 8  # diffusers' own check
        for name, size in (("height", height), ("width", width)):
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < multiple
                                     or size % multiple):
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {size!r}")
        param = pipe.unet.dtype
        device = pipe.device if pipe.device.type != "meta" else torch.device("cpu")
        generator = None if seed is None else torch.Generator("cpu").manual_seed(seed)
        with self.lock, torch.inference_mode():
            out = pipe(prompt=prompt, image_embeds=image_embeds.to(device=device, dtype=param),
                       negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                       guidance_scale=float(guidance_scale), noise_level=noise_level, height=height, width=width,
                       num_images_per_prompt=num_images, generator=generator)
        return list(out.images)


# ---------------------------------------------------------------- a tiny random pipeline (tests, demos)
def _byte_unicode() -> list[str]:
    """The 256 printable characters standing for bytes in CLIP's byte-level BPE (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tiny_pipeline(embedding_dim: int = 1024, *, seed: int = 0, image_encoder: bool = False) -> Any:
    """A randomly initialised ``StableUnCLIPImg2ImgPipeline`` of a few hundred thousand parameters, built from
    configs (nothing downloaded): 32-pixel latents per 64-pixel image, a character-level CLIP tokenizer.
    Its pictures are noise-like; it exists to test the wiring. ``image_encoder``: add a tiny CLIP vision
    encoder and feature extractor (to test loading a pipeline that has them)."""
    diffusers = _diffusers()
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    chars = _byte_unicode()
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    hidden = 32
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=hidden, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
        class_embed_type="projection", projection_class_embeddings_input_dim=2 * embedding_dim).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
        sample_size=64).eval()
    normalizer = diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer.StableUnCLIPImageNormalizer(
        embedding_dim=embedding_dim)
    with torch.no_grad():  # a non-trivial normaliser, so that scale/unscale are exercised
        normalizer.mean.normal_(0, 0.1)
        normalizer.std.uniform_(0.5, 1.5)
    components: dict[str, Any] = dict(
        feature_extractor=None, image_encoder=None, image_normalizer=normalizer,
        image_noising_scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet,
        scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1),
        vae=vae)
    if image_encoder:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        components["image_encoder"] = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=hidden, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
            patch_size=16, projection_dim=embedding_dim)).eval()
        components["feature_extractor"] = CLIPImageProcessor(crop_size=32, size=32)
    pipe = diffusers.StableUnCLIPImg2ImgPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe

