"""Text encoders (T5-XXL, umT5-XXL) and the Wan VAEs through transformers / diffusers, local weights only.

SPEC-models §4 (Cosmos: T5-XXL 1024-d; Wan: umT5-XXL 4096-d; 512 tokens, padded rows zero; Wan2.1 and
Cosmos: the Wan2.1 VAE, stride (4, 8, 8); Wan2.2 TI2V-5B: the Wan2.2 VAE, stride (4, 16, 16), 48
channels; latents normalised per channel), SPEC-rcm §11.2 (the
negative prompt's embedding is CFG's uncondition). Installed by the `media` extra. Nothing here
downloads: every load is `local_files_only` from a folder the caller names, in the Hugging Face
layout of the "-Diffusers" releases (the repo root with text_encoder/, tokenizer/, vae/, or one of
those folders itself). The official single-file .pth encoders and VAE are not read.
"""

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_LEN = 512  # tokens per prompt fed to the DiTs (SPEC-models §4)
VAE_STRIDE = (4, 8, 8)  # Wan2.1 VAE (time, height, width) compression (SPEC-models §4)
LATENT_CHANNELS = 16


class PromptTooLongError(ValueError):
    """A prompt tokenizes to more tokens than the encoder's max length; the message lists which."""


def require(module: str):
    """Import an optional dependency, or ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is needed for text encoders and the VAE: pip install 'rcmfn[media]'") from err


def resolve_folder(path: str | os.PathLike | None, sub: str, what: str, flag: str) -> Path:
    """The folder holding `what`: `path/sub` if present, else `path`; FileNotFoundError if absent."""
    if path is None:
        raise FileNotFoundError(f"no {what} given: pass {flag} with a local folder (nothing is downloaded)")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{what} weights not found: {root} is not a folder (pass {flag} with a local "
            f"Hugging Face folder, e.g. the {sub}/ folder of a -Diffusers release)"
        )
    folder = root / sub if (root / sub / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{what} weights not found: {folder} has no config.json (want a Hugging Face "
            f"folder with config.json and weights, or a release root with {sub}/)"
        )
    return folder


@dataclass
class TextEncoder:
    """A tokenizer and a T5-family encoder; `encode` gives DiT cross-attention states [B, L, D]."""

    tokenizer: object
    model: torch.nn.Module
    max_length: int = TEXT_LEN

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt including special tokens, without truncation."""
        return [len(ids) for ids in self.tokenizer(list(prompts), padding=False, truncation=False)["input_ids"]]

    def check_lengths(self, prompts: list[str], what: str = "prompt") -> None:
        """PromptTooLongError naming every prompt of more than `max_length` tokens (`what` names the role)."""
        counts = self.token_counts(prompts)
        bad = [(i, n) for i, n in enumerate(counts) if n > self.max_length]
        if bad:
            listed = "; ".join(f"{what} {i} ({n} tokens): {prompts[i][:60]!r}" for i, n in bad[:5])
            raise PromptTooLongError(f"{len(bad)} {what}(s) longer than {self.max_length} tokens: {listed}")

    @torch.no_grad()
    def encode(self, prompts: list[str], truncate: bool = False, what: str = "prompt") -> torch.Tensor:
        """Last hidden states [B, max_length, D], rows past each prompt's length zero. SPEC-models §4.

        A prompt longer than max_length raises PromptTooLongError unless `truncate` (the official
        pipelines truncate silently).
        """
        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        if not truncate:
            self.check_lengths(prompts, what)
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
            return_attention_mask=True,
        )
        device = next(self.model.parameters()).device
        mask = tokens["attention_mask"].to(device)
        states = self.model(input_ids=tokens["input_ids"].to(device), attention_mask=mask).last_hidden_state
        return states * mask[..., None].to(states.dtype)


def load_text_encoder(
    path: str | os.PathLike | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    max_length: int = TEXT_LEN,
) -> TextEncoder:
    """A T5 / umT5 encoder and its tokenizer from a local folder (model type read from config.json)."""
    folder = resolve_folder(path, "text_encoder", "text encoder", "--text-encoder")
    own = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "spiece.model"))
    tokenizer_folder = folder if own or not (folder.parent / "tokenizer").is_dir() else folder.parent / "tokenizer"
    transformers = require("transformers")
    kind = transformers.AutoConfig.from_pretrained(folder, local_files_only=True).model_type
    classes = {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel"}
    if kind not in classes:
        raise ValueError(f"{folder}: text encoder of type {kind!r}; expected one of {sorted(classes)}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"no usable tokenizer in {tokenizer_folder} ({err})") from err
    model = getattr(transformers, classes[kind]).from_pretrained(folder, local_files_only=True, dtype=dtype)
    return TextEncoder(tokenizer, model.to(device).eval(), max_length)


def latent_shape(
    frames: int,
    height: int,
    width: int,
    stride: tuple[int, int, int] = VAE_STRIDE,
    channels: int = LATENT_CHANNELS,
) -> tuple[int, int, int, int]:
    """(C, T, H, W) of the VAE latent of `frames` x `height` x `width` pixels. SPEC-models §3.4, §4.

    Defaults: the Wan2.1 VAE; the Wan2.2 VAE is stride (4, 16, 16), 48 channels (`ModelSpec.vae_stride`).
    """
    s_t, s_h, s_w = stride
    if frames < 1 or (frames - 1) % s_t:
        raise ValueError(f"frames must be 1 + {s_t} k (1, {1 + s_t}, {1 + 2 * s_t}, ...); got {frames}")
    if height < s_h or width < s_w or height % s_h or width % s_w:
        raise ValueError(f"height and width must be positive multiples of {s_h}; got {height} x {width}")
    return channels, 1 + (frames - 1) // s_t, height // s_h, width // s_w


@dataclass
class Vae:
    """A Wan VAE (2.1, or 2.2 with `stride` (4, 16, 16)) with its per-channel latent normalisation
    z = (mu - mean) / std. SPEC-models §4."""

    model: torch.nn.Module
    mean: torch.Tensor  # [C] float32
    std: torch.Tensor  # [C] float32
    stride: tuple[int, int, int] = VAE_STRIDE

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = (1, -1, 1, 1, 1)
        return self.mean.to(like.device).view(view), self.std.to(like.device).view(view)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, C, T, H/s, W/s] float32 (posterior mean)."""
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, F, H, W]; got {tuple(pixels.shape)}")
        latent_shape(*pixels.shape[2:], self.stride)
        weight = next(self.model.parameters())
        mu = self.model.encode(pixels.to(weight.device, weight.dtype)).latent_dist.mean.float()
        mean, std = self._stats(mu)
        return (mu - mean) / std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, T, H, W] -> pixels [B, 3, 1 + 4 (T - 1), s H, s W] float32 in [-1, 1]."""
        if latents.dim() != 5 or latents.shape[1] != self.mean.numel():
            raise ValueError(f"latents must be [B, {self.mean.numel()}, T, H, W]; got {tuple(latents.shape)}")
        weight = next(self.model.parameters())
        mean, std = self._stats(weight)
        z = latents.to(weight.device, torch.float32) * std + mean
        return self.model.decode(z.to(weight.dtype)).sample.float().clamp(-1.0, 1.0)


def load_vae(
    path: str | os.PathLike | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    stride: tuple[int, int, int] = VAE_STRIDE,
    channels: int = LATENT_CHANNELS,
) -> Vae:
    """The diffusers AutoencoderKLWan in a local folder (a release root with vae/, or the vae/ folder).

    `stride` and `channels` are what the model needs (`ModelSpec.vae_stride`, `.channels`): the Wan2.1 VAE
    by default, (4, 16, 16) and 48 for the Wan2.2 VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json:
    z_dim 48, scale_factor_spatial 16, patch_size 2, is_residual). A folder holding another VAE raises.
    """
    folder = resolve_folder(path, "vae", "VAE", "--vae")
    model = require("diffusers").AutoencoderKLWan.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    cfg = model.config
    strides = (cfg.scale_factor_temporal, cfg.scale_factor_spatial, cfg.scale_factor_spatial)
    stats_ok = len(cfg.latents_mean) == len(cfg.latents_std) == cfg.z_dim
    if strides != tuple(stride) or cfg.z_dim != channels or not stats_ok:
        raise ValueError(
            f"{folder}: not the model's VAE (strides {strides}, want {tuple(stride)}; z_dim {cfg.z_dim}, want "
            f"{channels}, with {len(cfg.latents_mean)} means and {len(cfg.latents_std)} stds)"
        )
    stats = [torch.tensor(v, dtype=torch.float32) for v in (cfg.latents_mean, cfg.latents_std)]
    return Vae(model.to(device).eval(), *stats, tuple(stride))


def write_tiny_text_encoder(folder: str | os.PathLike, kind: str = "umt5", dim: int = 24, seed: int = 0) -> Path:
    """Save a tiny random T5/umT5 encoder and a word-level tokenizer (tests and offline demos only).

    The vocabulary is the letters a-z as words plus "w0".."w99"; anything else maps to <unk>.
    """
    transformers, tokenizers = require("transformers"), require("tokenizers")
    words = ["<pad>", "</s>", "<unk>", *"abcdefghijklmnopqrstuvwxyz", *(f"w{i}" for i in range(100))]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    config_class, model_class = {"t5": ("T5Config", "T5EncoderModel"), "umt5": ("UMT5Config", "UMT5EncoderModel")}[kind]
    config = getattr(transformers, config_class)(
        vocab_size=len(words),
        d_model=dim,
        d_kv=8,
        d_ff=2 * dim,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
    )
    torch.manual_seed(seed)
    folder = Path(folder)
    getattr(transformers, model_class)(config).save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def write_tiny_vae(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Save a tiny random Wan2.1-shaped VAE (16 latent channels, stride 4/8/8) as folder/vae (tests, demos).

    The Wan2.2 layout (48 channels, stride 4/16/16): rcmfn.tiny_codecs.write_tiny_wan22_vae."""
    diffusers = require("diffusers")
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKLWan(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    model.save_pretrained(Path(folder) / "vae")
    return Path(folder)
