"""The language model's visual-token sampler (`LavitForCausalLM.sample_visual_tokens`): LaVIT's classifier-free
guidance with one batched forward per token.

The original runs transformers' unbatched CFG (a second forward per token on the bare `[IMG]` context).
Here the conditional rows and the unconditional rows share one batch and one KV cache; the scores are
mixed exactly as that processor mixes them (`g * (log_softmax(c) - log_softmax(u)) + log_softmax(u)`),
and the rest of the processing follows transformers 4.33's order (minimum length, suppression, then
temperature, top-k, top-p). Everything runs on the model's device.

The output head computes only the logits of ids that can be sampled (LaVIT suppresses the 32000 text ids
after `[IMG]`, two thirds of its vocabulary); the others are -inf, which gives the same distribution as the
original's full logits, since the guidance's log-softmax constants cancel in every later step.
The full head is kept where slicing would change what runs (`can_slice_head`: hooks on the model or the
head, as accelerate's offload and device maps add; quantised, adapter or biased heads).

Speed knobs (all keep the sampled tokens and the random-number consumption unchanged):

* `cache_implementation="static"`: a preallocated `transformers.StaticCache` with a fixed-size padding
  mask that is filled in place, so every decoding step has the same shapes;
* `compile=True` (with the static cache): the decoding step goes through `torch.compile`
  (`mode="reduce-overhead"`, i.e. CUDA graphs, on CUDA); the prefill stays eager;
* `stop_check_interval`: how often the host looks at "have all rows finished?" (a device→host sync).
  No check happens before `min_new_tokens`, since `[/IMG]` cannot be sampled then. Between checks the
  random state after every step is recorded, so that when the last row finished before the check the
  extra steps are dropped and the random state is rewound: the output and the random state after the
  call are the same as with a check at every step.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, LogitsProcessorList, PreTrainedModel, StaticCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

CACHE_IMPLEMENTATIONS = ("dynamic", "static")
STATIC_CACHE_ROUNDING = (
    64  # static cache lengths are rounded up to this, so nearby prompt lengths share a compiled step
)


class StaticDecodingState:
    """A model's reusable static cache and compiled decoding step (a new StaticCache or a new compiled function per
    call would make torch.compile recompile each time). Kept on the model instance as `_static_decoding`; neither
    copied nor pickled with it (a copy starts empty), and never part of its state dict or config."""

    def __init__(self):
        self.key, self.cache, self.compiled = None, None, None

    def __deepcopy__(self, memo) -> StaticDecodingState:
        return StaticDecodingState()

    def __reduce__(self):
        return StaticDecodingState, ()


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


def logits_warpers(*, do_sample: bool, temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """Temperature, top-k, top-p (when sampling), in transformers 4.33's order."""
    warpers = LogitsProcessorList()
    if do_sample:
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
    return warpers


def suppression_masks(
    vocab_size: int, suppress_ids: range, eos_token_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (V,) masks of the ids set to -inf: before `min_new_tokens` (suppressed ids and eos) and after
    (suppressed ids). Built once, instead of transformers' per-step `isin` over the whole vocabulary; the masked
    scores are the same values as `MinNewTokensLengthLogitsProcessor` + `SuppressTokensLogitsProcessor` give."""
    late = torch.zeros(vocab_size, dtype=torch.bool)
    ids = torch.as_tensor(list(suppress_ids), dtype=torch.long)
    late[ids[(ids >= 0) & (ids < vocab_size)]] = True
    early = late.clone()
    early[eos_token_id] = True
    return early.to(device), late.to(device)


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
        return torch.cat(
            [torch.multinomial(p[None].to(g.device), 1, generator=g).to(p.device)[0] for p, g in zip(probs, generator)]
        )
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---------------------------------------------------------------------- random state (for lazy stop checks)


def _rng_state(generator, device: torch.device):
    """The state of every generator `pick_tokens` may draw from (host-side, no device sync)."""
    if isinstance(generator, list):
        return [g.get_state() for g in generator]
    if generator is not None:
        return generator.get_state()
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(generator, device: torch.device, state) -> None:
    if isinstance(generator, list):
        for g, s in zip(generator, state):
            g.set_state(s)
    elif generator is not None:
        generator.set_state(state)
    elif device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _can_rewind(generator, device: torch.device) -> bool:
    """Whether the random state of a multinomial draw on `device` can be saved and restored."""
    return isinstance(generator, (list, torch.Generator)) or device.type in ("cpu", "cuda")


# ---------------------------------------------------------------------- forward


def execution_device(model) -> torch.device:
    """Where the model computes: `model.device`, or with accelerate's offload hooks (weights on the meta device)
    the hooks' execution device."""
    if model.device.type != "meta":
        return model.device
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return model.device


def sampled_id_runs(never_sampled: torch.Tensor) -> tuple[slice, ...]:
    """never_sampled (V,) bool -> the runs of ids that can be sampled, as slices (LaVIT: [0, 3) and [32000, V))."""
    edges = torch.diff(torch.cat([never_sampled.new_ones(1), never_sampled.cpu(), never_sampled.new_ones(1)]).int())
    starts, stops = (edges == -1).nonzero().flatten().tolist(), (edges == 1).nonzero().flatten().tolist()
    return tuple(slice(start, stop) for start, stop in zip(starts, stops))


def can_slice_head(model) -> bool:
    """Whether the output head can be read in slices: a transformers model whose `base_model` gives the hidden
    states and whose `lm_head` is a plain `nn.Linear` (not a quantised or adapter layer) without bias, with its
    weights in place, and no hook on the model or the head (accelerate's offload and device maps move the
    weights inside theirs; a caller's forward hooks expect the module's own forward to run)."""
    head = getattr(model, "lm_head", None)
    return (
        isinstance(model, PreTrainedModel)
        and model.base_model is not model
        and type(head) is torch.nn.Linear
        and head.bias is None
        and head.weight.is_floating_point()
        and head.weight.device.type != "meta"
        and not any(has_hooks(module) for module in (model, head))
    )


def has_hooks(module: torch.nn.Module) -> bool:
    """An accelerate hook or a forward (pre-)hook on `module` itself."""
    return hasattr(module, "_hf_hook") or bool(module._forward_hooks) or bool(module._forward_pre_hooks)


def _last_logits(model, ids, mask, positions, cache, id_runs: tuple[slice, ...] | None = None) -> torch.Tensor:
    """One forward; (rows, V) logits of the last position. With `id_runs`, only those ids' logits are computed
    (rows of the head that are never read for the others) and the other ids get -inf."""
    if id_runs is None:
        return model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        ).logits[:, -1]
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    hidden = hidden.last_hidden_state[:, -1]
    weight = model.lm_head.weight
    logits = hidden.new_full((len(hidden), weight.shape[0]), -float("inf"))
    for run in id_runs:
        logits[:, run] = torch.nn.functional.linear(hidden, weight[run])
    return logits


def _static_state(model, rows: int, max_cache_len: int, compile: bool) -> tuple[StaticCache, object]:
    """A reset StaticCache for (rows, max_cache_len) and the decoding-step function, both reused across calls."""
    state = getattr(model, "_static_decoding", None)
    if state is None:
        state = model._static_decoding = StaticDecodingState()
    dtype, device = model.dtype, model.device
    key = (rows, max_cache_len, dtype, device)
    if state.key != key:
        state.key = key
        state.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    else:
        state.cache.reset()
    if compile and state.compiled is None:
        mode = "reduce-overhead" if device.type == "cuda" else None
        state.compiled = torch.compile(_last_logits, mode=mode, fullgraph=True)
    return state.cache, state.compiled if compile else _last_logits


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
    cache_implementation: str = "dynamic",
    compile: bool = False,
    stop_check_interval: int | None = None,
) -> torch.Tensor:
    """Generate after each prompt (1-D ids ending with `[IMG]`) until `eos_token_id` or `max_new_tokens`. Works on any
    transformers causal LM; `LavitForCausalLM.sample_visual_tokens` fills in LaVIT's ids from its config.

    Args (beyond the sampling ones):
        cache_implementation: `"dynamic"` (a growing `DynamicCache`) or `"static"` (a preallocated `StaticCache`,
            fixed shapes per step; reused across calls with the same batch and length).
        compile: `torch.compile` the decoding step (needs `cache_implementation="static"`); CUDA graphs on CUDA.
        stop_check_interval: look at "all rows finished?" every this many steps once `[/IMG]` is possible
            (each look is a device→host sync). Default: 1 on CPU (a sync costs nothing there), 8 elsewhere.
            The result does not depend on it.

    Returns (B, T) generated ids, rows that finished early padded with `pad_token_id`.
    """
    if cache_implementation not in CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"`cache_implementation` must be one of {CACHE_IMPLEMENTATIONS}, got {cache_implementation!r}."
        )
    if compile and cache_implementation != "static":
        raise ValueError('`compile=True` needs `cache_implementation="static"` (fixed shapes per step).')
    batch = len(prompts)
    guided = guidance_scale != 1.0
    rows = prompts + [torch.tensor(unconditional_prompt)] * batch if guided else prompts
    device = execution_device(model)
    ids, mask = (t.to(device) for t in left_pad(rows, pad_token_id))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt_length = ids.shape[1]

    if cache_implementation == "static":
        max_cache_len = -(-(prompt_length + max_new_tokens) // STATIC_CACHE_ROUNDING) * STATIC_CACHE_ROUNDING
        cache, step_fn = _static_state(model, len(rows), max_cache_len, compile)
        full_mask = torch.zeros((len(rows), max_cache_len), dtype=mask.dtype, device=device)
        full_mask[:, :prompt_length] = mask
        mask = full_mask  # filled in place, one column per step: the same tensor (and shape) every step
    else:
        cache, step_fn = DynamicCache(config=model.config), _last_logits

    vocab_size = model.config.vocab_size
    early_mask, late_mask = suppression_masks(vocab_size, suppress_ids, eos_token_id, device)
    id_runs = sampled_id_runs(late_mask) if can_slice_head(model) else None
    # Scores are cut after the last id that can be sampled: words added after the visual ids never change the
    # draws (a multinomial's random stream depends on the number of categories).
    sampled = int((~late_mask).nonzero().max()) + 1
    early_mask, late_mask = early_mask[:sampled], late_mask[:sampled]
    warpers = logits_warpers(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    interval = stop_check_interval or (1 if device.type == "cpu" else 8)
    if do_sample and not _can_rewind(generator, device):
        interval = 1
    rewind = do_sample and interval > 1

    generated = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    states: dict[int, object] = {}  # step -> random state after that step's draw, since the last check
    produced, reported = max_new_tokens, 0
    for step in range(max_new_tokens):
        forward = _last_logits if step == 0 else step_fn  # the prefill is never compiled
        scores = guided_scores(
            forward(model, ids, mask, positions, cache, id_runs)[:, :sampled].float(), guidance_scale
        )
        scores = scores.masked_fill(early_mask if step < min_new_tokens else late_mask, -float("inf"))
        scores = warpers(generated[:, :step], scores)
        next_ids = torch.where(unfinished, pick_tokens(scores, do_sample, generator), pad_token_id)
        generated[:, step] = next_ids
        unfinished &= next_ids != eos_token_id
        if rewind and step >= min_new_tokens:
            states[step] = _rng_state(generator, device)
        last = step == max_new_tokens - 1
        checked = last or (step >= min_new_tokens and (step - min_new_tokens + 1) % interval == 0)
        if checked:
            if not unfinished.any():
                # The step at which the last row emitted eos: the later steps (pads only) do not count.
                finished_at = int((generated[:, : step + 1] == eos_token_id).int().argmax(dim=1).max())
                produced = finished_at + 1
                if rewind and finished_at < step:
                    _set_rng_state(generator, device, states[finished_at])
            states.clear()
        if progress_bar is not None and (checked or step < min_new_tokens):  # steps that can no longer be dropped
            progress_bar.update(min(step + 1, produced) - reported)
            reported = min(step + 1, produced)
        if last or produced <= step + 1:
            break
        ids = next_ids.repeat(2 if guided else 1)[:, None]
        if cache_implementation == "static":
            mask[:, prompt_length + step] = 1
        else:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    return generated[:, :produced]
