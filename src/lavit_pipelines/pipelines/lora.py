"""LoRA loading for the LaVIT pipelines, on diffusers' LoRA machinery.

LaVIT's UNet has SDXL's shapes, so UNet LoRAs use diffusers' SDXL format (keys `unet.*`, loaded with
`UNet2DConditionModel.load_lora_adapter`); the language model's adapters are peft LoRAs loaded like the
text-encoder LoRAs of `StableDiffusionXLLoraLoaderMixin` (keys `language_model.*`). `set_adapters`,
`fuse_lora`, `unfuse_lora`, `unload_lora_weights`, `disable_lora`, `delete_adapters` come from diffusers'
`LoraBaseMixin` and act on every component listed in `_lora_loadable_modules`.
"""

import os
import re

import torch
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.utils import logging

from .base import first_line, is_hub_id

logger = logging.get_logger(__name__)

LANGUAGE_MODEL = "language_model"


# A LoRA layer's weights in diffusers' formats: `<component>.<module>.lora.down.weight` (or lora_linear_layer, lora_A).
LORA_KEY = re.compile(
    r"(?P<component>[^.]+)\.(?P<module>.+?)\.(?:lora(?:_linear_layer)?\.(?P<updown>down|up)|lora_(?P<ab>[AB]))\.weight"
)


def check_lora_sizes(state_dict: dict, components: dict) -> None:
    """ValueError naming the layer and dimension when a LoRA layer's input or output size differs from the layer it
    adapts in `components` (an adapter for another model size), or that layer does not exist."""
    for key, tensor in state_dict.items():
        match = LORA_KEY.fullmatch(key)
        if match is None or match["component"] not in components:
            continue
        try:
            layer = components[match["component"]].get_submodule(match["module"])
        except AttributeError:
            raise ValueError(
                f"`lora`: {key} adapts `{match['component']}.{match['module']}`, which this model does not "
                f"have: the adapter is for another model."
            ) from None
        weight = getattr(getattr(layer, "base_layer", layer), "weight", None)
        if weight is None:
            continue
        is_input = match["updown"] == "down" or match["ab"] == "A"
        axis, side = (1, "input") if is_input else (0, "output")
        if tensor.shape[axis] != weight.shape[axis]:
            raise ValueError(
                f"`lora`: the adapter is for another model size: {key} has {side} dimension {tensor.shape[axis]}, "
                f"`{match['component']}.{match['module']}` has {weight.shape[axis]}."
            )


class LavitLoraLoaderMixin(StableDiffusionXLLoraLoaderMixin):
    """`load_lora_weights` / `save_lora_weights` for `unet` and `language_model` adapters."""

    _lora_loadable_modules = ["unet", LANGUAGE_MODEL]
    text_encoder_name = LANGUAGE_MODEL

    @classmethod
    def checked_lora_state_dict(cls, source: str | os.PathLike | dict, unet_config=None, **kwargs) -> tuple:
        """diffusers' `lora_state_dict(..., return_lora_metadata=True)` of `source`, checked before any model is
        touched: FileNotFoundError for a local path that does not exist (no Hub lookup), ValueError for what is not
        a LoRA of this pipeline's components (every parameter name must contain 'lora')."""
        if isinstance(source, dict):
            source = source.copy()
        else:
            source = os.fspath(source)
            if not os.path.exists(source) and not is_hub_id(source):
                raise FileNotFoundError(f"`lora`: no such file or folder {source!r}.")
        try:
            state_dict, network_alphas, metadata = cls.lora_state_dict(
                source, unet_config=unet_config, return_lora_metadata=True, **kwargs
            )
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ValueError(f"`lora`: {source!r} is not a LoRA file diffusers reads ({first_line(error)}).") from None
        named = f"`lora` ({source!r})" if isinstance(source, str) else "`lora`"
        not_lora = [key for key in state_dict if "lora" not in key]
        if not state_dict or not_lora:
            raise ValueError(
                f"{named} is not a LoRA: every parameter name must contain 'lora', got "
                f"{not_lora[0] if not_lora else 'no parameters'!r}."
            )
        prefixes = {key.split(".")[0] for key in state_dict}
        if not prefixes <= set(LavitLoraLoaderMixin._lora_loadable_modules):
            raise ValueError(
                f"{named} holds weights for {sorted(prefixes)}; LaVIT adapters are for `unet` and `language_model`."
            )
        if not prefixes & set(cls._lora_loadable_modules):
            raise ValueError(
                f"{named} holds weights for {sorted(prefixes)} only; {cls.__name__} loads {cls._lora_loadable_modules}."
            )
        return state_dict, network_alphas, metadata

    def load_lora_weights(
        self, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict, adapter_name: str | None = None, **kwargs
    ):
        """Load a LoRA file (folder, Hub id, file name via `weight_name=`, or state dict) into the components it
        has weights for; `adapter_name` names it for `set_adapters`. Checked first (`checked_lora_state_dict`,
        then every adapted layer's sizes against this pipeline's models): nothing changes when it does not fit."""
        unet = getattr(self, "unet", None)
        state_dict, network_alphas, metadata = self.checked_lora_state_dict(
            pretrained_model_name_or_path_or_dict, unet_config=unet.config if unet is not None else None, **kwargs
        )
        prefixes = {key.split(".")[0] for key in state_dict}
        for ignored in sorted(prefixes - set(self._lora_loadable_modules)):
            logger.warning(f"{type(self).__name__} has no `{ignored}`: the LoRA's `{ignored}` weights are not loaded.")
        check_lora_sizes(
            state_dict, {name: getattr(self, name) for name in prefixes & set(self._lora_loadable_modules)}
        )
        if "unet" in prefixes:
            self.load_lora_into_unet(
                state_dict,
                network_alphas=network_alphas,
                unet=unet,
                adapter_name=adapter_name,
                metadata=metadata,
                _pipeline=self,
            )
        if LANGUAGE_MODEL in prefixes:
            self.load_lora_into_text_encoder(
                state_dict,
                network_alphas=network_alphas,
                text_encoder=self.language_model,
                prefix=LANGUAGE_MODEL,
                lora_scale=self.lora_scale,
                adapter_name=adapter_name,
                metadata=metadata,
                _pipeline=self,
            )

    def unload_lora_weights(self):
        """diffusers' `unload_lora_weights`, after unfusing what `fuse_lora` merged: the base weights come back
        (as `unfuse_lora` restores them, up to floating-point rounding) instead of keeping the adapter merged."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        fused = [
            name
            for name in self._lora_loadable_modules
            if getattr(self, name, None) is not None
            and any(isinstance(layer, BaseTunerLayer) and layer.merged for layer in getattr(self, name).modules())
        ]
        if fused:
            self.unfuse_lora(components=fused)
        super().unload_lora_weights()

    @classmethod
    def load_lora_into_text_encoder(
        cls,
        state_dict,
        network_alphas,
        text_encoder,
        prefix=LANGUAGE_MODEL,
        lora_scale=1.0,
        adapter_name=None,
        _pipeline=None,
        metadata=None,
        **kwargs,
    ):
        """Inject the `prefix.*` LoRA layers of `state_dict` into the language model with peft and load them
        (`inject_adapter_in_model` + `set_peft_model_state_dict`). diffusers' text-encoder path goes through
        transformers' adapter API, which needs a newer peft than LaVIT requires; this keeps to peft itself."""
        from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
        from diffusers.utils.peft_utils import _create_lora_config, get_adapter_name, scale_lora_layers
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        state_dict = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
        if metadata is not None:
            metadata = {
                k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")
            } or None
        state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
        ranks = {key: value.shape[1] for key, value in state_dict.items() if "lora_B" in key}
        if network_alphas:
            network_alphas = {
                k.removeprefix(f"{prefix}."): v for k, v in network_alphas.items() if k.startswith(f"{prefix}.")
            }
        config = _create_lora_config(state_dict, network_alphas, metadata, ranks, is_unet=False)
        adapter_name = adapter_name or get_adapter_name(text_encoder)
        model_offload, sequential_offload, _ = cls._optionally_disable_offloading(_pipeline)
        inject_adapter_in_model(config, text_encoder, adapter_name=adapter_name)
        set_peft_model_state_dict(text_encoder, state_dict, adapter_name=adapter_name)
        scale_lora_layers(text_encoder, weight=lora_scale)
        text_encoder.to(device=text_encoder.device, dtype=text_encoder.dtype)
        if model_offload:
            _pipeline.enable_model_cpu_offload()
        elif sequential_offload:
            _pipeline.enable_sequential_cpu_offload()

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        unet_lora_layers: dict[str, torch.Tensor] | None = None,
        language_model_lora_layers: dict[str, torch.Tensor] | None = None,
        unet_lora_adapter_metadata: dict | None = None,
        language_model_lora_adapter_metadata: dict | None = None,
        **kwargs,
    ):
        """Write `pytorch_lora_weights.safetensors` with the `unet.*` and `language_model.*` LoRA layers and their
        peft configs (metadata)."""
        layers = {"unet": unet_lora_layers, LANGUAGE_MODEL: language_model_lora_layers}
        metadata = {"unet": unet_lora_adapter_metadata, LANGUAGE_MODEL: language_model_lora_adapter_metadata}
        layers = {name: value for name, value in layers.items() if value}
        if not layers:
            raise ValueError("Pass `unet_lora_layers` and/or `language_model_lora_layers`.")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers=layers,
            lora_metadata={name: metadata[name] for name in layers},
            **kwargs,
        )

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ):
        """Merge the active adapters into the weights of `components` (default: every LoRA-loadable one)."""
        components = components or [name for name in self._lora_loadable_modules if getattr(self, name, None)]
        super().fuse_lora(
            components=components, lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names, **kwargs
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs):
        """Undo `fuse_lora` on `components` (default: every LoRA-loadable one)."""
        components = components or [name for name in self._lora_loadable_modules if getattr(self, name, None)]
        super(StableDiffusionXLLoraLoaderMixin, self).unfuse_lora(components=components, **kwargs)
