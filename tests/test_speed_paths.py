"""Speed and memory paths keep the results: static KV cache (+ torch.compile), lazy stop checks, stock
projections while sampling, SDPA in the vision/decoder attention, offloading, VAE tiling/slicing,
channels_last and `low_cpu_mem_usage` loading."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lavit_pipelines import LavitText2ImagePipeline
from lavit_pipelines.models import visual_sampling
from lavit_pipelines.models.pixel_decoder import LavitPixelDecoder
from lavit_pipelines.models.visual_sampling import sample_visual_tokens

IMG, END_IMG, PAD = 32000, 32001, 2


@pytest.fixture(scope="module")
def llm():
    """A tiny LLaMA with LaVIT's special ids and 64 visual codes; `[/IMG]` made likely so that rows stop early."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        vocab_size=32002 + 64,
        pad_token_id=PAD,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[END_IMG] *= 15
    return model


PROMPTS = [torch.tensor([5, 6, 7, 8, 9, IMG]), torch.tensor([11, IMG]), torch.tensor([300, 301, 302, IMG])]


def sample(model, do_sample, generator=None, prompts=PROMPTS, guidance_scale=3.0, **kwargs):
    return sample_visual_tokens(
        model,
        prompts,
        guidance_scale=guidance_scale,
        unconditional_prompt=[IMG],
        suppress_ids=range(3, 32000),
        eos_token_id=END_IMG,
        pad_token_id=PAD,
        min_new_tokens=3,
        max_new_tokens=24,
        do_sample=do_sample,
        temperature=1.0,
        top_k=20,
        top_p=0.9,
        generator=generator,
        **kwargs,
    )


def run_seeded(model, seed, **kwargs):
    """Tokens and the generator's state after the call."""
    generator = torch.Generator().manual_seed(seed)
    tokens = sample(model, True, generator, **kwargs)
    return tokens, generator.get_state()


VARIANTS = [
    dict(cache_implementation="static"),
    dict(stop_check_interval=5),
    dict(cache_implementation="static", stop_check_interval=64),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=["static", "check-every-5", "static-check-every-64"])
@pytest.mark.parametrize("guidance_scale", [3.0, 1.0], ids=["cfg", "no-cfg"])
def test_greedy_tokens_identical(llm, variant, guidance_scale):
    expected = sample(llm, False, guidance_scale=guidance_scale)
    assert torch.equal(sample(llm, False, guidance_scale=guidance_scale, **variant), expected)


@pytest.mark.parametrize("variant", VARIANTS, ids=["static", "check-every-5", "static-check-every-64"])
def test_sampled_tokens_and_random_state_identical(llm, variant):
    stopped_early = 0
    for seed in range(6):
        expected, expected_state = run_seeded(llm, seed)
        tokens, state = run_seeded(llm, seed, **variant)
        assert torch.equal(tokens, expected), seed
        assert torch.equal(state, expected_state), seed  # the noise drawn after the tokens is unchanged
        stopped_early += tokens.shape[1] < 24
    assert stopped_early  # the rewind of the random state after a late stop check was exercised


def test_global_rng_and_generator_list_identical(llm):
    torch.manual_seed(3)
    expected = sample(llm, True)
    expected_state = torch.get_rng_state()
    torch.manual_seed(3)
    assert torch.equal(sample(llm, True, cache_implementation="static", stop_check_interval=7), expected)
    assert torch.equal(torch.get_rng_state(), expected_state)
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]  # noqa: E731
    expected = sample(llm, True, generators())
    assert torch.equal(sample(llm, True, generators(), cache_implementation="static", stop_check_interval=4), expected)


def test_eos_finishes_rows_and_pads(llm):
    tokens = sample(llm, False)
    finished = (tokens == END_IMG).any(dim=1)
    assert finished.any()
    for row in tokens[finished]:
        end = int((row == END_IMG).nonzero()[0])
        assert end >= 3 and (row[end + 1 :] == PAD).all()  # min_new_tokens=3 holds [/IMG] back


def test_static_cache_is_reused_and_bad_arguments_rejected(llm):
    sample(llm, False, cache_implementation="static")
    cache = llm._static_decoding.cache
    sample(llm, False, cache_implementation="static")
    assert llm._static_decoding.cache is cache
    with pytest.raises(ValueError, match="cache_implementation"):
        sample(llm, False, cache_implementation="paged")
    with pytest.raises(ValueError, match="static"):
        sample(llm, False, compile=True)


def test_compiled_static_path_identical(llm, aot_eager_compile):
    """`compile=True` traces the decoding step with torch.compile (fullgraph) and gives the same tokens (aot_eager
    here, see the fixture)."""
    compiled = aot_eager_compile
    vars(llm).pop("_static_decoding", None)
    try:
        greedy = sample(llm, False)
        assert torch.equal(sample(llm, False, cache_implementation="static", compile=True), greedy)
        expected, expected_state = run_seeded(llm, 1)
        tokens, state = run_seeded(llm, 1, cache_implementation="static", compile=True)
        assert torch.equal(tokens, expected) and torch.equal(state, expected_state)
        assert len(compiled) == 1 and compiled[0]["fullgraph"]  # one compiled step, reused across calls
    finally:
        vars(llm).pop("_static_decoding", None)


def test_sampling_runs_the_stock_linear_forward(llm):
    """No per-module `forward` replacement while sampling: every projection is the class's own `nn.Linear`."""
    replaced = []
    hooks = [
        m.register_forward_pre_hook(lambda module, args: replaced.append("forward" in vars(module)))
        for m in llm.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        sample(llm, False)
    finally:
        for hook in hooks:
            hook.remove()
    assert replaced and not any(replaced)


def test_only_the_head_rows_that_can_be_sampled_are_computed(llm):
    """NaN in every suppressed row of the output head changes no token (with the full head, NaN logits would
    spread through the guidance's log-softmax); a model whose head runs under an accelerate hook takes the
    full head and gives the same tokens, and a caller's forward hook on the model still runs."""
    greedy, (seeded, state) = sample(llm, False), run_seeded(llm, 3)
    poisoned = copy.deepcopy(llm)
    with torch.no_grad():
        poisoned.lm_head.weight[3:32000] = float("nan")
    assert visual_sampling.can_slice_head(poisoned)
    assert torch.equal(sample(poisoned, False), greedy)
    tokens, poisoned_state = run_seeded(poisoned, 3)
    assert torch.equal(tokens, seeded) and torch.equal(poisoned_state, state)
    hooked = copy.deepcopy(llm)
    hooked.lm_head._hf_hook = object()  # what accelerate's add_hook_to_module leaves on a module
    assert not visual_sampling.can_slice_head(hooked)
    assert torch.equal(sample(hooked, False), greedy)
    assert torch.equal(run_seeded(hooked, 3)[0], seeded)
    calls = []
    handle = llm.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        assert torch.equal(sample(llm, False), greedy) and calls  # a caller's hook on the model still runs
    finally:
        handle.remove()


def test_sliced_head_logits_are_each_rows_product_with_the_full_head(llm):
    """Every CFG row's sampled-id logits are that row's product alone with the full head (as in the original's
    separate conditional and unconditional forwards) to float rounding; the suppressed text ids are -inf."""
    ids, mask = visual_sampling.left_pad(PROMPTS + [torch.tensor([IMG])] * 3, PAD)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    runs = visual_sampling.sampled_id_runs(
        visual_sampling.suppression_masks(llm.config.vocab_size, range(3, 32000), END_IMG, "cpu")[1]
    )
    with torch.no_grad():
        logits = visual_sampling._last_logits(llm, ids, mask, positions, DynamicCache(config=llm.config), runs)
        hidden = llm.base_model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state[:, -1]
        for row in range(len(ids)):
            alone = llm.lm_head(hidden[row : row + 1])[0]
            torch.testing.assert_close(logits[row, IMG:], alone[IMG:], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logits[row, :3], alone[:3], rtol=1e-5, atol=1e-5)
        assert torch.isinf(logits[:, 3:IMG]).all()


# ------------------------------------------------------------------ vision / decoder attention


def test_pixel_decoder_attention_is_sdpa_and_bf16_close(converted_dir, monkeypatch):
    decoder = LavitPixelDecoder.from_pretrained(converted_dir, subfolder="pixel_decoder")
    codes = [torch.arange(3, 40), torch.arange(100, 180)]
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        fp32 = decoder(codes)
        assert calls and set(calls) == {torch.float32}
        calls.clear()
        bf16 = decoder.to(torch.bfloat16)(codes)
    assert calls and set(calls) == {torch.bfloat16}
    for name in ("prompt_embeds", "pooled_prompt_embeds"):
        expected, actual = getattr(fp32, name), getattr(bf16, name).float()
        assert (actual - expected).norm() / expected.norm() < 2e-2, name


# ------------------------------------------------------------------ pipeline memory knobs


@pytest.fixture(scope="module")
def speed_pipe(converted_dir):
    pipe = LavitText2ImagePipeline.from_pretrained(converted_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decode_kwargs(batch=2):
    latents = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    codes = [torch.arange(5, 60), torch.arange(200, 230)][:batch]
    return dict(visual_token_ids=codes, latents=latents, num_inference_steps=2, output_type="np")


def test_pipeline_static_cache_tokens_identical(speed_pipe):
    kwargs = dict(max_new_tokens=24, min_new_tokens=4)
    expected = speed_pipe.generate_visual_tokens(
        ["a duck", "a red car"], generator=torch.Generator().manual_seed(0), **kwargs
    )
    static = speed_pipe.generate_visual_tokens(
        ["a duck", "a red car"], generator=torch.Generator().manual_seed(0), cache_implementation="static", **kwargs
    )
    assert all(torch.equal(a, b) for a, b in zip(static, expected))
    single = speed_pipe.generate_visual_tokens("a duck", generator=torch.Generator().manual_seed(0), **kwargs)
    out = speed_pipe(
        "a duck",
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        num_inference_steps=1,
        llm_decoding_kwargs={"cache_implementation": "static"},
        **kwargs,
    )
    assert torch.equal(out.visual_token_ids[0], single[0])


def test_vae_tiling_and_channels_last(speed_pipe):
    """channels_last keeps the images; tiling (decoding 64² tiles of a 128² image with blended seams) is an
    approximation, since the VAE's mid-block attention no longer sees the whole latent: same image up to seams."""
    kwargs = dict(
        decode_kwargs(),
        latents=torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
        height=128,
        width=128,
    )
    expected = speed_pipe(**kwargs).images
    try:
        speed_pipe.vae.enable_tiling()
        tiled = speed_pipe(**kwargs).images
    finally:
        speed_pipe.vae.disable_tiling()
    assert tiled.shape == expected.shape and not np.array_equal(tiled, expected)  # the tiles were really used
    assert np.corrcoef(tiled.ravel(), expected.ravel())[0, 1] > 0.8 and np.abs(tiled - expected).mean() < 0.1
    try:
        speed_pipe.unet.to(memory_format=torch.channels_last)
        speed_pipe.vae.to(memory_format=torch.channels_last)
        channels_last = speed_pipe(**decode_kwargs()).images
    finally:
        speed_pipe.unet.to(memory_format=torch.contiguous_format)
        speed_pipe.vae.to(memory_format=torch.contiguous_format)
    assert np.abs(channels_last - speed_pipe(**decode_kwargs()).images).max() < 1e-4


def test_slicing_alone_is_exact(speed_pipe):
    expected = speed_pipe(**decode_kwargs()).images
    try:
        speed_pipe.vae.enable_slicing()
        sliced = speed_pipe(**decode_kwargs()).images
    finally:
        speed_pipe.vae.disable_slicing()
    assert np.abs(sliced - expected).max() < 1e-5


def test_low_cpu_mem_usage_loading_keeps_outputs(converted_dir, speed_pipe):
    expected = speed_pipe(**decode_kwargs(1)).images
    expected_codes = speed_pipe.generate_visual_tokens("a duck", do_sample=False, min_new_tokens=4, max_new_tokens=12)
    pipe = LavitText2ImagePipeline.from_pretrained(converted_dir, low_cpu_mem_usage=True)
    pipe.set_progress_bar_config(disable=True)
    for component in (pipe.language_model, pipe.pixel_decoder, pipe.unet, pipe.vae):
        assert not any(p.is_meta for p in component.parameters())
    assert np.abs(pipe(**decode_kwargs(1)).images - expected).max() < 1e-6
    codes = pipe.generate_visual_tokens("a duck", do_sample=False, min_new_tokens=4, max_new_tokens=12)
    assert torch.equal(codes[0], expected_codes[0])


def test_execution_device_sees_through_offload_hooks(llm):
    """With sequential offload the weights sit on the meta device; sampling must run where the hooks compute."""

    class Hook:
        execution_device = "cpu"

    meta = LlamaForCausalLM(llm.config).to("meta")
    meta.model.embed_tokens._hf_hook = Hook()
    assert visual_sampling.execution_device(meta) == torch.device("cpu")
    assert visual_sampling.execution_device(llm) == torch.device("cpu")


def test_vision_components_compute_the_same_under_per_module_offload_hooks(converted_dir, reference):
    """`enable_sequential_cpu_offload` hooks every leaf module: each weight must be used through its own module's
    forward (EVA's qkv, the codebook lookup) and outputs must survive accelerate's device moves."""
    import copy

    from accelerate import cpu_offload

    from lavit_pipelines import LavitPixelDecoder, LavitVisualTokenizer

    pixels = reference[1]["pixel_values"]
    tokenizer = LavitVisualTokenizer.from_pretrained(converted_dir / "visual_tokenizer")
    decoder = LavitPixelDecoder.from_pretrained(converted_dir / "pixel_decoder")
    hooked_tokenizer, hooked_decoder = copy.deepcopy(tokenizer), copy.deepcopy(decoder)
    for model in (hooked_tokenizer, hooked_decoder):
        cpu_offload(model, execution_device=torch.device("cpu"), offload_buffers=True)
    with torch.no_grad():
        codes = tokenizer.tokenize(pixels, generator=torch.Generator().manual_seed(0))
        hooked_codes = hooked_tokenizer.tokenize(pixels, generator=torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(codes, hooked_codes))
        plain, hooked = decoder(codes), hooked_decoder(codes)
    torch.testing.assert_close(hooked.prompt_embeds, plain.prompt_embeds)
    torch.testing.assert_close(hooked.pooled_prompt_embeds, plain.pooled_prompt_embeds)
