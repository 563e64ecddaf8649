"""Visual-token sampling for text-to-image: LaVIT's classifier-free guidance with one batched forward per token.

The original runs transformers' unbatched CFG (a second forward per token on the bare `[IMG]` context).
Here the conditional rows and the unconditional rows share one batch and one KV cache; the scores are
mixed exactly as that processor mixes them (`g * (log_softmax(c) - log_softmax(u)) + log_softmax(u)`),
and the rest of the processing uses transformers' logits processors in the original's order.
"""

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def left_pad(sequences: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row 1-D ids -> left-padded ids (B, L) and attention mask (B, L) of 0/1."""
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, -len(seq) :] = torch.as_tensor(seq)
            mask[row, -len(seq) :] = 1
    return ids, mask


def logits_processors(
    *, suppress_ids: range, eos_token_id: int, min_new_tokens: int, do_sample: bool, temperature: float, top_k: int, top_p: float, device
) -> LogitsProcessorList:
    """Suppression, minimum length and (when sampling) temperature, top-k, top-p: transformers 4.33's order."""
    processors = LogitsProcessorList(
        [
            MinNewTokensLengthLogitsProcessor(0, min_new_tokens, eos_token_id, device=device),
            SuppressTokensLogitsProcessor(list(suppress_ids), device=device),
        ]
    )
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


def guided_scores(logits: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """(2B, V) logits, conditional rows first -> (B, V) guided log-probabilities; (B, V) passes through
    unchanged when there is no guidance."""
    if guidance_scale == 1.0:
        return logits
    cond, uncond = logits.float().log_softmax(dim=-1).chunk(2)
    return guidance_scale * (cond - uncond) + uncond


def pick_tokens(scores: torch.Tensor, do_sample: bool, generator) -> torch.Tensor:
    """(B, V) scores -> (B,) next ids: argmax, or one multinomial draw for the whole batch (one per row with a
    list of generators)."""
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p[None].to(g.device), 1, generator=g).to(p.device)[0] for p, g in zip(probs, generator)])
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def sample_visual_tokens(
    model,
    prompts: list[torch.Tensor],
    *,
    guidance_scale: float,
    unconditional_prompt: list[int],
    suppress_ids: range,
    eos_token_id: int,
    pad_token_id: int,
    min_new_tokens: int,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    generator=None,
    progress_bar=None,
) -> torch.Tensor:
    """Generate after each prompt (1-D ids ending with `[IMG]`) until `eos_token_id` or `max_new_tokens`.

    Returns (B, T) generated ids, rows that finished early padded with `pad_token_id`.
    """
    batch = len(prompts)
    guided = guidance_scale != 1.0
    rows = prompts + [torch.tensor(unconditional_prompt)] * batch if guided else prompts
    device = model.device
    ids, mask = (t.to(device) for t in left_pad(rows, pad_token_id))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    processors = logits_processors(
        suppress_ids=suppress_ids, eos_token_id=eos_token_id, min_new_tokens=min_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, device=device,
    )
    cache = DynamicCache(config=model.config)
    generated = torch.empty((batch, 0), dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        ).logits[:, -1]
        scores = processors(generated, guided_scores(logits.float(), guidance_scale))
        next_ids = torch.where(unfinished, pick_tokens(scores, do_sample, generator), pad_token_id)
        generated = torch.cat([generated, next_ids[:, None]], dim=1)
        unfinished &= next_ids != eos_token_id
        if progress_bar is not None:
            progress_bar.update()
        if not unfinished.any():
            break
        ids = next_ids.repeat(2 if guided else 1)[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    return generated
