"""Stage 2: train the pixel decoder (and the UNet, fully or with LoRA) to condition the diffusion decoder.

The visual tokenizer and the VAE are frozen. Per image: its own visual tokens -> the pixel decoder's UNet
conditioning; the VAE latents are noised at a random timestep and the UNet predicts the noise (ε) or the
velocity (v) with the MSE of diffusers' training scripts. With probability `condition_dropout` an image is
conditioned on the decoder's negative condition instead (zeros for the high-res decoder, the learned
`negative_condition` for the low-res one), which is what classifier-free guidance uses at inference.
With `snr_gamma`, each example's loss is weighted by Min-SNR (`min(SNR, γ) / SNR` for ε, `/(SNR + 1)` for v),
which puts the weight on the noisy timesteps where the conditioning decides the picture.
Class examples (`class_data`, marked by the `prior` column) weigh `prior_loss_weight` in the loss, as in the
language-model stage (DreamBooth's prior preservation). `train_pixel_decoder=False` freezes the pixel decoder
(only the UNet or its LoRA trains).
With `cache_latents`, every image is encoded once before training (as diffusers' DreamBooth scripts do) and
each step draws its latents from the stored posterior, with the same random numbers as an encoding would.
"""

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import EMAModel, cast_training_params, compute_snr
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..image_processor import LavitImageProcessor
from .data import PRIOR
from .loop import Stage, lora_layers, per_example


@torch.no_grad()
def standardize_decoder_input(decoder) -> None:
    """Make the decoder's input projection see its codebook standardised per channel (mean over the codes
    removed, each channel divided by its spread), so that codes close together on the sphere still give the
    decoder inputs as far apart as its initialisation expects."""
    codes = decoder.codebook.weight.float()
    mean, spread = codes.mean(dim=0), codes.std(dim=0).clamp(min=1e-6)
    projection = decoder.input_proj
    weight = projection.weight.float() / spread
    projection.bias.copy_(projection.bias.float() - weight @ mean)
    projection.weight.copy_(weight)


class PixelDecoderTrainingModule(nn.Module):
    """Frozen visual tokenizer and VAE, the trained pixel decoder, the UNet (frozen, LoRA or trained)."""

    def __init__(
        self,
        components: dict,
        scheduler: DDPMScheduler,
        condition_dropout: float,
        snr_gamma: float | None = None,
        prior_loss_weight: float = 1.0,
    ):
        super().__init__()
        self.visual_tokenizer, self.pixel_decoder = components["visual_tokenizer"], components["pixel_decoder"]
        self.unet, self.vae = components["unet"], components["vae"]
        self.scheduler, self.condition_dropout, self.snr_gamma = scheduler, condition_dropout, snr_gamma
        self.prior_loss_weight = prior_loss_weight
        self.latent_parameters: torch.Tensor | None = None  # (N, 2C, h, w) on the CPU, with `cache_latents`

    @torch.no_grad()
    def cache_latents(self, data, batch_size: int) -> None:
        """Encode the `vae_pixel_values` of every example of `data` (an `IndexedDataset`): their VAE
        posteriors' parameters (N, 2C, h, w), float32 on the CPU, read by example index in each step."""
        parameters = []
        for start in range(0, len(data), batch_size):
            pixels = torch.stack(
                [data[i]["vae_pixel_values"] for i in range(start, min(start + batch_size, len(data)))]
            )
            posterior = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
            parameters.append(posterior.parameters.float().cpu())
        self.latent_parameters = torch.cat(parameters)

    def latent_dist(self, batch: dict) -> DiagonalGaussianDistribution:
        """The VAE posterior of each image of the batch: cached, or encoded now."""
        if self.latent_parameters is None:
            return self.vae.encode(batch["vae_pixel_values"].to(self.vae.dtype)).latent_dist
        parameters = self.latent_parameters[batch["index"].cpu()]
        return DiagonalGaussianDistribution(parameters.to(batch["vae_pixel_values"].device, self.vae.dtype))

    def condition(self, codes: list, drop: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        """Codes per image and drop (B,) bool -> UNet encoder states and extra kwargs, dropped rows negative.
        An image that kept no visual token is trained as a dropped (unconditional) row."""
        empty = torch.tensor([len(c) == 0 for c in codes], device=drop.device)
        drop = drop | empty
        out = self.pixel_decoder([c if len(c) else c.new_zeros(1) for c in codes])
        pick = lambda pos, neg: torch.where(drop.view(-1, *[1] * (pos.ndim - 1)), neg, pos)  # noqa: E731
        kwargs = {}
        if out.pooled_prompt_embeds is not None:
            time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=out.prompt_embeds.dtype, device=drop.device)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": pick(out.pooled_prompt_embeds, out.negative_pooled_prompt_embeds),
                "time_ids": time_ids.expand(len(drop), -1),
            }
        if out.prompt_attention_mask is not None:
            kwargs["encoder_attention_mask"] = pick(out.prompt_attention_mask, out.negative_prompt_attention_mask)
        return pick(out.prompt_embeds, out.negative_prompt_embeds), kwargs

    def forward(self, batch: dict, generators: list, step: int) -> dict:
        pixels = batch["vae_pixel_values"]
        with torch.no_grad():
            codes = self.visual_tokenizer.tokenize(batch["pixel_values"], generator=generators)
            latents = self.latent_dist(batch).sample(generator=generators) * self.vae.config.scaling_factor
        noise = randn_tensor(latents.shape, generator=generators, device=latents.device, dtype=latents.dtype)
        timesteps = per_example(
            generators, lambda g: torch.randint(self.scheduler.config.num_train_timesteps, (1,), generator=g)
        )
        timesteps = timesteps.to(latents.device)
        drop = per_example(generators, lambda g: torch.rand(1, generator=g)).to(latents.device) < self.condition_dropout
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        hidden, kwargs = self.condition(codes, drop, tuple(pixels.shape[-2:]))
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=hidden, **kwargs, return_dict=False)[0]
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        prior = batch.get(PRIOR, torch.zeros(len(pixels), dtype=torch.bool)).to(latents.device)
        weights = torch.where(prior, self.prior_loss_weight, 1.0)
        loss = self.loss(prediction.float(), target.float(), timesteps, weights)
        return {"loss": loss, "dropped": drop.float().mean()}

    def loss(
        self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """MSE, per example weighted by `weights` (the class examples' `prior_loss_weight`) and by Min-SNR when
        `snr_gamma` is set."""
        if self.snr_gamma is not None:
            snr = compute_snr(self.scheduler, timesteps)
            weights = (
                weights
                * snr.clamp(max=self.snr_gamma)
                / (snr + 1 if self.scheduler.config.prediction_type == "v_prediction" else snr)
            )
        return (F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()


class PixelDecoderStage(Stage):
    needed_components = ("visual_tokenizer", "pixel_decoder", "unet", "vae", "scheduler")

    def __init__(self, config, components, accelerator):
        super().__init__(config, components, accelerator)
        visual_tokenizer, decoder, unet, vae = (
            components[k] for k in ("visual_tokenizer", "pixel_decoder", "unet", "vae")
        )
        visual_tokenizer.requires_grad_(False)
        vae.requires_grad_(False)
        unet.requires_grad_(config.train_unet and not config.lora)
        decoder.requires_grad_(config.train_pixel_decoder)
        if config.init_decoder_input:
            standardize_decoder_input(decoder)
        if config.lora:
            from peft import LoraConfig

            unet.add_adapter(
                LoraConfig(
                    r=config.lora_rank,
                    lora_alpha=config.lora_alpha or config.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=config.unet_lora_target_modules,
                )
            )
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            decoder.enable_gradient_checkpointing()
        trained = ("pixel_decoder",) if config.train_pixel_decoder else ()
        self.trained_components = trained + (("unet",) if config.train_unet and not config.lora else ())
        scheduler = DDPMScheduler.from_config(components["scheduler"].config)
        if config.prediction_type is not None:
            scheduler.register_to_config(prediction_type=config.prediction_type)
        resolution = config.resolution or unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = resolution
        self.vae_processor = VaeImageProcessor(vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1))
        self.processor = LavitImageProcessor.from_visual_tokenizer_config(visual_tokenizer.config)
        self.module = PixelDecoderTrainingModule(
            components, scheduler, config.condition_dropout, config.snr_gamma, config.prior_loss_weight
        ).to(accelerator.device)
        self.ema = None
        if config.use_ema:
            cast_training_params(self.module, torch.float32)  # the EMA copies float32 weights
            self.ema = EMAModel(self.parameters_to_train(), decay=config.ema_decay)
            accelerator.register_for_checkpointing(self.ema)

    def transform(self, image, text: str) -> dict:
        return {
            "pixel_values": self.processor.preprocess(image)[0],
            "vae_pixel_values": self.vae_processor.preprocess(image, self.resolution, self.resolution)[0],
        }

    def initialize(self, data) -> None:
        if self.config.cache_latents:
            self.module.cache_latents(data, self.config.batch_size)

    def after_optimizer_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.step(self.parameters_to_train())

    def finish(self, output) -> dict:
        """EMA weights (when kept) go into the saved models; UNet LoRA layers into pytorch_lora_weights.safetensors."""
        if self.ema is not None:
            self.ema.copy_to(self.parameters_to_train())
        if self.config.lora:
            from ..pipelines.text2image import LavitText2ImagePipeline

            layers, metadata = lora_layers(self.components["unet"])
            LavitText2ImagePipeline.save_lora_weights(
                output, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata
            )
        return super().finish(output)
