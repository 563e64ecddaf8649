"""Convert the released LaVIT checkpoint (rain1011/LaVIT-7B-v2 layout) into one diffusers-style folder.

Every source tensor is mapped to a parameter of ours or knowingly ignored, every dimension is read off
tensor shapes (attention heads = width // 88), tensor files are streamed one at a time (memory-mapped,
`weights_only=True`), and the output is written to a temporary folder that is moved into place only
when complete.
"""

import json
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDIMScheduler, ModelMixin, UNet2DConditionModel
from diffusers import __version__ as diffusers_version
from diffusers.pipelines.pipeline_loading_utils import _fetch_class_library_tuple
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, LlamaConfig, PreTrainedModel

from .models.language_model import LavitConfig, LavitForCausalLM
from .models.pixel_decoder import LavitPixelDecoder
from .models.visual_tokenizer import LavitVisualTokenizer
from .pipelines.base import meta_model, read_model_index, resolve_component_class, weight_files
from .pipelines.text2image import LavitText2ImagePipeline
from .staging import REPLACED, apply_umask, clean_stale_staging, staging_folder
from .tokenization import load_lavit_tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PIXEL_DECODERS = {
    "highres": ("highres_pixel_decoding", "highres_tokenizer_decoder.bin"),
    "lowres": ("pixel_decoding", "tokenizer_decoder.bin"),
}

# (source-key regex, our key template or None to ignore). First full match wins.
EVA_KEYS = [
    (r"cls_token", "encoder.class_embedding"),
    (r"pos_embed", "encoder.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"encoder.patch_embedding.\1"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"encoder.layers.\1.\2.\3"),
    (r"blocks\.(\d+)\.attn\.(q_bias|v_bias|qkv\.weight)", r"encoder.layers.\1.attn.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.attn.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"encoder.layers.\1.mlp.net.0.proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"encoder.layers.\1.mlp.net.2.\2"),
    (r"(norm|head)\.(weight|bias)", None),  # EVA-CLIP's final norm and projection head: unused by LaVIT
]

# Shared by the token merger and the tokenizer decoders: both blocks are self-attn + cross-attn + MLP.
BLOCK_KEYS = [
    (r"norm0\.", "norm1."),
    (r"norm1\.", "norm2."),
    (r"norm2\.", "norm3."),
    (r"(token_causal_attn|self_attn)\.qkv\.", "self_attn.qkv."),
    (r"(token_causal_attn|self_attn)\.proj\.", "self_attn.out_proj."),
    (r"(token_cross_attn|cross_attn)\.query\.", "cross_attn.q_proj."),
    (r"(token_cross_attn|cross_attn)\.key\.", "cross_attn.k_proj."),
    (r"(token_cross_attn|cross_attn)\.value\.", "cross_attn.v_proj."),
    (r"(token_cross_attn|cross_attn)\.proj\.", "cross_attn.out_proj."),
    (r"mlp\.fc1\.", "mlp.net.0.proj."),
    (r"mlp\.fc2\.", "mlp.net.2."),
]


def _stage_keys(predictor: str, merger: str) -> list:
    """Key map for one stage of the token predictor + merger from `tokenizer_encoder.bin`/`visual_weight.bin`."""
    return [
        (r"token_predictor\.in_conv\.0\.(weight|bias)", rf"{predictor}.norm.\1"),
        (r"token_predictor\.in_conv\.1\.(weight|bias)", rf"{predictor}.input_proj.\1"),
        (r"token_predictor\.out_conv\.(\d)\.(weight|bias)", rf"{predictor}.score_mlp.\1.\2"),
        (r"causal_encoder\.ln_vision\.(weight|bias)", rf"{merger}.input_norm.\1"),
        (r"causal_encoder\.norm\.(weight|bias)", rf"{merger}.output_norm.\1"),
        (r"causal_encoder\.blocks\.(\d+)\.(.+)", rf"{merger}.blocks.\1.\2"),
    ]


STAGE1_KEYS = _stage_keys("token_predictor", "token_merger") + [
    (r"quantize\.embedding\.weight", "codebook.weight"),
    (r"encode_task_layer\.(\d)\.(weight|bias)", r"quantizer_proj.\1.\2"),
    (r"vit_proj\.(weight|bias)", None),  # the LLM projection belongs to stage 2 (STAGE2_KEYS)
]
STAGE2_KEYS = _stage_keys("understanding_predictor", "understanding_merger") + [
    (r"vit_proj\.(weight|bias)", r"llm_projection.\1"),
    (r"(quantize|encode_task_layer)\..+", None),  # the understanding head never quantizes
]
DECODER_KEYS = [
    (r"pos_embed", "code_position_embedding"),
    (r"query_embed", "query_embedding"),
    (r"in_proj\.(weight|bias)", r"input_proj.\1"),
    (r"blocks\.(\d+)\.(.+)", r"blocks.\1.\2"),
    (r"norm\.(weight|bias)", r"output_norm.\1"),
    (r"decode_task_layer\.(\d)\.(weight|bias)", r"output_proj.\1.\2"),
    (r"unet_proj(?:_1)?\.(weight|bias)", r"prompt_projections.0.\1"),
    (r"unet_proj_2\.(weight|bias)", r"prompt_projections.1.\1"),
    (r"unet_attnpool\.positional_embedding", "pooler.position_embedding"),
    (r"unet_attnpool\.(q_proj|k_proj|v_proj)\.(weight|bias)", r"pooler.\1.\2"),
    (r"unet_attnpool\.c_proj\.(weight|bias)", r"pooler.out_proj.\1"),
]


def map_key(key: str, mapping: list, source: Path) -> str | None:
    """Our name for `key` (None if knowingly ignored); KeyError naming the file if unmapped."""
    for pattern, template in mapping:
        match = re.fullmatch(pattern, key)
        if match:
            if template is None:
                return None
            new = match.expand(template)
            block = re.fullmatch(r"((?:.+\.)?blocks\.\d+\.)(.+)", new)
            return block.group(1) + _map_block_key(block.group(2)) if block else new
    raise KeyError(f"{source}: unexpected tensor {key!r}; the checkpoint does not have the LaVIT release layout.")


def _map_block_key(rest: str) -> str:
    for pattern, replacement in BLOCK_KEYS:
        if re.match(pattern, rest):
            return re.sub(pattern, replacement, rest, count=1)
    raise KeyError(f"unexpected block tensor {rest!r}")


def load_tensors(path: Path):
    """Memory-mapped state dict (or single tensor) of a release `.bin`, with a clear error if unreadable."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a truncated or corrupt file
        raise ValueError(f"Could not read tensor file {path}: {error}") from error


def mapped_state_dict(path: Path, *mappings: list) -> dict:
    """Load `path` and map its keys with each mapping in turn (a tensor may feed several of our keys)."""
    source = load_tensors(path)
    state = {}
    for mapping in mappings:
        for key, tensor in source.items():
            new = map_key(key, mapping, path)
            if new is not None:
                state[new] = tensor
    return state


def _count_blocks(state: dict, prefix: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))})


def _build(model_cls, config: dict, state: dict, dtype: torch.dtype | None):
    """Instantiate on the meta device and assign `state` (strict: every parameter filled, nothing extra)."""
    with init_empty_weights():
        model = model_cls.from_config(config)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def convert_visual_tokenizer(src: Path, dtype) -> LavitVisualTokenizer:
    """EVA encoder + stage-1 (`tokenizer_encoder.bin`) + stage-2 (`visual_weight.bin` over stage 1)."""
    tokenizer_dir = src / "visual_tokenizer"
    state = mapped_state_dict(tokenizer_dir / "eva_vitg_psz14.bin", EVA_KEYS)
    # Stage 2 starts as a copy of stage 1 (as the original loads it), then visual_weight.bin overrides
    # every tensor it holds.
    state.update(mapped_state_dict(tokenizer_dir / "tokenizer_encoder.bin", STAGE1_KEYS, STAGE2_KEYS))
    state.update(mapped_state_dict(src / "language_model" / "visual_weight.bin", STAGE2_KEYS))
    width = state["encoder.class_embedding"].shape[-1]
    patch = state["encoder.patch_embedding.weight"].shape[-1]
    grid = round((state["encoder.position_embedding"].shape[1] - 1) ** 0.5)
    config = dict(
        image_size=grid * patch,
        patch_size=patch,
        hidden_size=width,
        encoder_layers=_count_blocks(state, "encoder.layers"),
        encoder_mlp_dim=state["encoder.layers.0.mlp.net.0.proj.weight"].shape[0],
        merger_layers=_count_blocks(state, "token_merger.blocks"),
        merger_mlp_dim=state["token_merger.blocks.0.mlp.net.0.proj.weight"].shape[0],
        codebook_size=state["codebook.weight"].shape[0],
        codebook_dim=state["codebook.weight"].shape[1],
        llm_hidden_size=state["llm_projection.weight"].shape[0],
    )
    return _build(LavitVisualTokenizer, config, state, dtype)


def convert_pixel_decoder(src: Path, variant: str, dtype) -> LavitPixelDecoder:
    """Tokenizer decoder + the codebook copy (+ the learned negative condition for low-res)."""
    folder, filename = PIXEL_DECODERS[variant]
    state = mapped_state_dict(src / "visual_tokenizer" / filename, DECODER_KEYS)
    codebook = load_tensors(src / "visual_tokenizer" / "tokenizer_encoder.bin")["quantize.embedding.weight"]
    state["codebook.weight"] = codebook
    projections = sorted(k for k in state if k.startswith("prompt_projections.") and k.endswith(".weight"))
    config = dict(
        variant=variant,
        codebook_size=codebook.shape[0],
        codebook_dim=codebook.shape[1],
        hidden_size=state["input_proj.weight"].shape[0],
        num_layers=_count_blocks(state, "blocks"),
        mlp_dim=state["blocks.0.mlp.net.0.proj.weight"].shape[0],
        num_queries=state["query_embedding"].shape[1],
        output_dim=state["output_proj.2.weight"].shape[0],
        prompt_embed_dims=[state[k].shape[0] for k in projections],
        pooled_embed_dim=None,
    )
    if variant == "highres":
        config["pooled_embed_dim"] = state["pooler.out_proj.weight"].shape[0]
    else:
        uncond = load_tensors(src / folder / "uncond_embeddings.bin")
        state["negative_condition"] = uncond.reshape(-1, uncond.shape[-1])
        config["negative_condition_length"] = state["negative_condition"].shape[0]
    return _build(LavitPixelDecoder, config, state, dtype)


def _llm_shards(lm_dir: Path) -> list[Path]:
    index = lm_dir / "pytorch_model.bin.index.json"
    if index.is_file():
        return sorted({lm_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
    return [lm_dir / "pytorch_model.bin"]


def convert_language_model(src: Path, dst: Path, dtype, text_vocab_size: int) -> None:
    """Stream the LLaMA shards one by one into safetensors shards of the same split; write the configs.
    LaVIT's ids follow the text vocabulary: [IMG], [/IMG], then one id per visual code up to the vocab size."""
    lm_dir = src / "language_model"
    llama = LlamaConfig.from_pretrained(lm_dir).to_dict()
    ids = LavitConfig.id_layout(text_vocab_size, llama["vocab_size"] - text_vocab_size - 2)
    config = LavitConfig.from_dict({**llama, **ids})
    with init_empty_weights():
        expected = {key: tuple(tensor.shape) for key, tensor in LavitForCausalLM(config).state_dict().items()}
    shards = _llm_shards(lm_dir)
    dst.mkdir(parents=True)
    weight_map, total_size = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        state = {}
        for key, tensor in load_tensors(shard).items():
            if key.endswith("rotary_emb.inv_freq"):
                continue  # a buffer that older transformers saved; recomputed from the config
            if key not in expected:
                raise KeyError(f"{shard}: unexpected tensor {key!r} for a LLaMA language model.")
            if tuple(tensor.shape) != expected[key]:
                raise ValueError(
                    f"{shard}: the language model's {key} has shape {tuple(tensor.shape)}, its config "
                    f"{lm_dir / 'config.json'} implies {expected[key]}."
                )
            state[key] = (tensor.to(dtype) if dtype is not None else tensor).contiguous()
            weight_map[key] = name
            total_size += state[key].numel() * state[key].element_size()
        save_file(state, dst / name, metadata={"format": "pt"})
        del state
    missing = expected.keys() - weight_map.keys()
    if missing:
        raise KeyError(f"{lm_dir}: the language model lacks tensors {sorted(missing)[:5]}...")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.dtype = dtype or next(iter(load_tensors(shards[0]).values())).dtype
    config.save_pretrained(dst)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(dst)


def save_tokenizer(src: Path, dst: Path):
    """LaVIT's LLaMA tokenizer (left padding, eos as pad, as the original sets it); returns it."""
    try:
        tokenizer = load_lavit_tokenizer(src / "language_model")
    except Exception as error:  # noqa: BLE001 - a corrupt sentencepiece model: name the file
        raise ValueError(f"Could not read {src / 'language_model' / 'tokenizer.model'}: {error}") from error
    tokenizer.save_pretrained(dst)
    return tokenizer


def _source_dtype(path: Path) -> torch.dtype:
    """dtype of the first floating-point tensor in a `.bin` or `.safetensors` file."""
    if path.suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            return f.get_tensor(next(iter(f.keys()))).dtype
    return next(v for v in load_tensors(path).values() if v.is_floating_point()).dtype


def convert_unet(folder: Path, dst: Path, dtype) -> None:
    """The UNet (the release's largest file), streamed: memory-mapped tensors assigned to a model built on the
    meta device, so memory stays near the file's size. Its keys are diffusers' current ones."""
    weights = next(folder.glob("diffusion_pytorch_model.*"))
    state = load_file(weights) if weights.suffix == ".safetensors" else load_tensors(weights)
    try:
        model = _build(UNet2DConditionModel, UNet2DConditionModel.load_config(folder), state, dtype)
    except (RuntimeError, OSError, ValueError) as error:
        raise ValueError(f"{weights} does not fit {folder / 'config.json'}: {error}") from error
    model.save_pretrained(dst)


def convert_vae(folder: Path, dst: Path, dtype) -> None:
    """The VAE through diffusers' own loader, which knows the older attention key layout of SD-1.5's VAE."""
    weights = next(folder.glob("diffusion_pytorch_model.*"))
    try:
        model = AutoencoderKL.from_pretrained(
            folder, use_safetensors=weights.suffix == ".safetensors", dtype=dtype or _source_dtype(weights)
        )
    except Exception as error:  # noqa: BLE001 - a truncated file or a broken config: name the file
        raise ValueError(f"Could not read {weights} with its config: {error}") from error
    model.save_pretrained(dst)


def convert_scheduler(folder: Path, dst: Path) -> None:
    """The original loads the release's scheduler configs (EulerDiscrete / PNDM) as DDIM; so do we."""
    DDIMScheduler.from_config(DDIMScheduler.load_config(folder)).save_pretrained(dst)


SAFETY_FILES = [
    "pixel_decoding/safety_checker/config.json",
    "pixel_decoding/feature_extractor/preprocessor_config.json",
]


def required_files(variant: str, safety_checker: bool = False) -> list[str]:
    """Release files the conversion reads (LLM weights are checked separately: one file or an index + shards)."""
    folder, decoder_file = PIXEL_DECODERS[variant]
    files = [
        "language_model/config.json",
        "language_model/tokenizer.model",
        "language_model/visual_weight.bin",
        "visual_tokenizer/eva_vitg_psz14.bin",
        "visual_tokenizer/tokenizer_encoder.bin",
        f"visual_tokenizer/{decoder_file}",
        f"{folder}/unet/config.json",
        f"{folder}/vae/config.json",
        f"{folder}/scheduler/scheduler_config.json",
    ]
    files += [f"{folder}/uncond_embeddings.bin"] if variant == "lowres" else []
    return files + (SAFETY_FILES if safety_checker else [])


def resolve_source(checkpoint: str, variant: str, safety_checker: bool = False) -> Path:
    """A local release folder, or a Hub repo id downloaded with only the files this conversion needs."""
    if os.path.isdir(checkpoint):
        return Path(checkpoint)
    if os.path.exists(checkpoint) or checkpoint.startswith((".", "/")) or checkpoint.count("/") != 1:
        raise FileNotFoundError(f"`checkpoint_path`: {checkpoint!r} is neither a folder nor a Hub repo id.")
    from huggingface_hub import snapshot_download

    folder = PIXEL_DECODERS[variant][0]
    patterns = required_files(variant, safety_checker) + [
        "language_model/pytorch_model*",
        f"{folder}/unet/*",
        f"{folder}/vae/*",
    ]
    patterns += ["pixel_decoding/safety_checker/*"] if safety_checker else []
    return Path(snapshot_download(checkpoint, allow_patterns=patterns))


def check_source(src: Path, variant: str, safety_checker: bool = False) -> None:
    """FileNotFoundError naming the first missing release file, before anything is written."""
    llm = src / "language_model"
    llm_weights = [llm / "pytorch_model.bin.index.json"] if (llm / "pytorch_model.bin.index.json").is_file() else []
    needed = [src / f for f in required_files(variant, safety_checker)]
    needed += _llm_shards(llm) if llm_weights or (llm / "pytorch_model.bin").is_file() else [llm / "pytorch_model.bin"]
    folder = src / PIXEL_DECODERS[variant][0]
    for sub in ("unet", "vae"):
        if not any((folder / sub).glob("diffusion_pytorch_model.*")):
            needed.append(folder / sub / "diffusion_pytorch_model.bin")
    for path in needed:
        if not path.is_file():
            raise FileNotFoundError(f"Missing release file {path} (expected the rain1011/LaVIT-7B-v2 layout).")


def write_components(src: Path, out: Path, variant: str, dtype, safety_checker: bool = False) -> None:
    """Every component into `out/<name>/`, then `model_index.json`. The safety checker and its feature
    extractor are already in Hugging Face format and are copied as they are."""
    folder = src / PIXEL_DECODERS[variant][0]
    tokenizer = save_tokenizer(src, out / "tokenizer")
    convert_language_model(src, out / "language_model", dtype, len(tokenizer))
    convert_visual_tokenizer(src, dtype).save_pretrained(out / "visual_tokenizer")
    convert_pixel_decoder(src, variant, dtype).save_pretrained(out / "pixel_decoder")
    convert_unet(folder / "unet", out / "unet", dtype)
    convert_vae(folder / "vae", out / "vae", dtype)
    convert_scheduler(folder / "scheduler", out / "scheduler")
    classes = {
        "tokenizer": type(tokenizer),
        "language_model": LavitForCausalLM,
        "visual_tokenizer": LavitVisualTokenizer,
        "pixel_decoder": LavitPixelDecoder,
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "scheduler": DDIMScheduler,
    }
    if safety_checker:
        from transformers import CLIPImageProcessor  # imported here: without torchvision it logs a fallback notice

        for name, cls in (("safety_checker", StableDiffusionSafetyChecker), ("feature_extractor", CLIPImageProcessor)):
            shutil.copytree(
                src / "pixel_decoding" / name, out / name, ignore=shutil.ignore_patterns("*.bin", "*.msgpack")
            )
            classes[name] = cls
    index = {"_class_name": "LavitText2ImagePipeline", "_diffusers_version": diffusers_version}
    index.update({name: list(_fetch_class_library_tuple(cls)) for name, cls in classes.items()})
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def check_paths(src: Path, dst: Path) -> None:
    """ValueError unless the output lies apart from the source and the current directory: it may not be the
    source, inside it, or above it, nor the current directory or above it (whatever `overwrite` says)."""
    source, output, cwd = src.resolve(), dst.resolve(), Path.cwd().resolve()
    if output == source or output in source.parents or source in output.parents:
        raise ValueError(f"`dump_path` {dst} overlaps the source checkpoint {src}; choose an output folder outside it.")
    if output == cwd or output in cwd.parents:
        raise ValueError(f"`dump_path` {dst} is the current directory or one of its parents; choose a new folder.")


def claim_output(dst: Path, overwrite: bool) -> tuple[int, int, int] | None:
    """The identity (device, inode, modification time) of the existing output that `overwrite` allows to replace;
    None when there is nothing to replace (no output, or an empty folder). FileExistsError when there is something
    and no `overwrite`."""
    if not dst.exists() and not dst.is_symlink() or dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
        return None
    if not overwrite:
        raise FileExistsError(f"`dump_path` {dst} exists and is not empty; pass --overwrite to replace it.")
    return _identity(dst)


def _identity(path: Path) -> tuple[int, int, int]:
    """What tells a file or folder apart from one put in its place later (an inode number alone may be reused)."""
    status = path.lstat()
    return status.st_dev, status.st_ino, status.st_mtime_ns


def publish(staging: Path, dst: Path, claimed: tuple[int, int, int] | None) -> None:
    """Rename the finished `staging` folder to `dst`. Without a claim the rename only succeeds where `dst` is absent
    or an empty folder; with one, `dst` is first moved aside, and put back unless it is the claimed output.
    FileExistsError when something else took the place meanwhile: it is left as it is."""
    backup = None
    if claimed is not None:
        backup = staging_folder(dst, REPLACED)
        try:
            os.rename(dst, backup / dst.name)
        except FileNotFoundError:  # the claimed output is gone already: nothing to replace
            backup.rmdir()
            backup = None
        else:
            if _identity(backup / dst.name) != claimed:
                os.rename(backup / dst.name, dst)
                backup.rmdir()
                raise FileExistsError(f"`dump_path` {dst} was replaced during the conversion; it was left as it is.")
    try:
        os.rename(staging, dst)
    except OSError as error:
        if backup is not None:
            os.rename(backup / dst.name, dst)
            backup.rmdir()
        raise FileExistsError(f"`dump_path` {dst} appeared during the conversion; it was left as it is.") from error
    if backup is not None:
        shutil.rmtree(backup)


def validate_output(out: Path) -> None:
    """Every staged component read back before publishing: the loader's own checks (allowed classes, configs,
    every tensor present with the shape its config implies), each tensor read back and finite, the tokenizer and
    scheduler reloaded, and the pipeline assembled from the reloaded configs (components that fit together)."""
    LavitText2ImagePipeline.check_folder(out, passed={})
    index = read_model_index(out)
    components = {}
    for name in LavitText2ImagePipeline.component_names():
        cls = resolve_component_class(name, index.get(name), out / "model_index.json", None)
        if cls is None:
            components[name] = None
        elif issubclass(cls, (ModelMixin, PreTrainedModel)):
            check_tensors_finite(name, out / name)
            components[name] = meta_model(name, out / name, cls)
        else:
            components[name] = cls.from_pretrained(out / name)
    LavitText2ImagePipeline(**components)


def check_tensors_finite(name: str, folder: Path) -> None:
    """ValueError naming the component and tensor when a stored floating-point tensor holds NaN or infinity; reads
    one tensor at a time."""
    for path in weight_files(name, folder):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise ValueError(
                        f"The converted component `{name}` holds NaN or infinite values in {key} ({path})."
                    )


def convert(
    checkpoint: str,
    dump_path: str,
    variant: str = "highres",
    dtype: str | None = None,
    overwrite: bool = False,
    safety_checker: bool = False,
) -> Path:
    """Convert `checkpoint` (folder or Hub id) into `dump_path`, with the release's safety checker if asked.

    Refuses an output that overlaps the source or the current directory, and a non-empty `dump_path` unless
    `overwrite`. Writes into a hidden sibling folder, validates every component there, and renames it into place
    only then, replacing nothing but the output checked at the start. Staging folders of killed conversions are
    removed first."""
    if variant not in PIXEL_DECODERS:
        raise ValueError(f"`pixel_decoder` must be one of {sorted(PIXEL_DECODERS)}, got {variant!r}.")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype!r}.")
    dst = Path(dump_path).absolute()
    src = resolve_source(checkpoint, variant, safety_checker)
    check_paths(src, dst)
    claimed = claim_output(dst, overwrite)
    check_source(src, variant, safety_checker)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(dst.parent)
    staging = staging_folder(dst)
    try:
        write_components(src, staging, variant, DTYPES.get(dtype), safety_checker)
        validate_output(staging)
        apply_umask(staging)
        publish(staging, dst, claimed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst
