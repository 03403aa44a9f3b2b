"""rcmfn.diffusers_scheduler: diffusers.WanPipeline with FewStepScheduler samples what rcmfn samples.

A tiny pipeline built from configs, nothing downloaded: the exported tiny Wan student loaded by
from_pretrained, a tiny umT5 encoder and Wan VAE, and a word-level stand-in for the tokenizer (the
`tokenizers` package that a T5 tokenizer needs is not installed; the pipeline only calls it).
"""

import math

import pytest
import torch

from rcmfn.few_step import FewStepSettings
from rcmfn.models.diffusers_folder import write_diffusers_folder
from rcmfn.precond import trigflow_denoiser
from rcmfn.samplers import consistency_sample
from tests.rcmfn.models import diffusers_helpers as h

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from rcmfn.diffusers_scheduler import FewStepScheduler  # noqa: E402  (needs diffusers)

TEXT_LEN = 6


class WordTokenizer:
    """What WanPipeline calls of a tokenizer: ids of whitespace words (hash into the vocabulary), eos 1,
    padded with 0 to max_length, with the attention mask."""

    def __call__(self, prompts, max_length, **_):
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = [3 + sum(map(ord, w)) % 29 for w in prompt.split()][: max_length - 1] + [1]
            ids[row, : len(words)] = torch.tensor(words)
        return type("Tokens", (), {"input_ids": ids, "attention_mask": (ids > 0).long()})()


@pytest.fixture(scope="module")
def pipeline_and_student(tmp_path_factory):
    spec = h.wan_spec()
    params = h.poisoned(h.our_module(spec), seed=11)
    folder = write_diffusers_folder(spec, params, tmp_path_factory.mktemp("sched") / "student")
    torch.manual_seed(0)
    encoder = transformers.UMT5EncoderModel(
        transformers.UMT5Config(
            vocab_size=32,
            d_model=spec.text_dim,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
        )  # fmt: skip
    ).eval()
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
    settings = FewStepSettings(sigma_max=80.0, mid_times=(1.5, 1.4, 1.0))
    pipe = diffusers.WanPipeline(
        tokenizer=WordTokenizer(), text_encoder=encoder, vae=vae,
        transformer=diffusers.WanTransformer3DModel.from_pretrained(folder).float().eval(),
        scheduler=FewStepScheduler(sigma_max=settings.sigma_max, mid_times=settings.mid_times),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe, spec, params, settings


def run(pipe, steps, latents, **kwargs):
    return pipe(
        prompt=["a red fox", "two cats on a roof"], height=32, width=48, num_frames=5, num_inference_steps=steps,
        guidance_scale=1.0, max_sequence_length=TEXT_LEN, latents=latents, output_type="latent", **kwargs,
    ).frames  # fmt: skip


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_wan_pipeline_with_our_scheduler_gives_rcmfns_latents(steps, pipeline_and_student):
    pipe, spec, params, settings = pipeline_and_student
    noise = torch.randn(steps, 2, 16, 2, 4, 6, generator=torch.Generator().manual_seed(steps))
    got = run(pipe, steps, pipe.scheduler.use_noise(noise))
    with torch.no_grad():
        cond, _ = pipe.encode_prompt(["a red fox", "two cats on a roof"], do_classifier_free_guidance=False,
                                     max_sequence_length=TEXT_LEN)  # fmt: skip
    denoise = trigflow_denoiser(spec.velocity_net(h.our_module(spec)), net_dtype=torch.float32)
    expected = consistency_sample(denoise, params, noise, settings.trig_times(steps), cond)
    assert got.shape == expected.shape == noise.shape[1:]
    assert expected.abs().mean() > 0.1
    # float32 on both sides, different operation orders (diffusers re-noises in its own sigma space): 2.4e-6
    # to 9.3e-6 measured at 1-4 steps on one CPU; 4e-5 leaves room for another CPU's matmul kernels while a
    # wrong time or parameterisation is off by 1e-3 or more (the pipeline's own unit noise: 1.4e-3 - 3e-2).
    assert h.max_relative_error(got, expected) <= 4e-5
    assert pipe.scheduler.timesteps.tolist() == pytest.approx((1000.0 * settings.rf_times(steps)).tolist(), rel=1e-6)


def test_each_step_is_x0_then_renoise_in_float64():
    """step on hand-made numbers: x0 = x - r v, then (1 - r') x0 + r' eps, against the TrigFlow route
    x0 = cos t x_t - sin t F (rcmfn.precond) at x_t = x (cos t + sin t)."""
    sched = FewStepScheduler(sigma_max=80.0, mid_times=(1.2, 0.7))
    sched.set_timesteps(3)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    sched.use_noise(noise)
    t, t_next = math.atan(80.0), 1.2
    x_t = x * (math.cos(t) + math.sin(t))
    F = ((math.cos(t) - math.sin(t)) * x_t + v) / (math.cos(t) + math.sin(t))
    x0 = math.cos(t) * x_t - math.sin(t) * F
    expected = (math.cos(t_next) * x0 + math.sin(t_next) * noise[1]) / (math.cos(t_next) + math.sin(t_next))
    torch.testing.assert_close(sched.step(v, sched.timesteps[0], x).prev_sample, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(sched.start_latents(noise[0]), noise[0] / (math.cos(t) + math.sin(t)))
    sched.step(v, sched.timesteps[1], x)
    last = sched.step(v, sched.timesteps[2], x, return_dict=False)[0]  # the last step returns x0 itself
    r = math.sin(0.7) / (math.sin(0.7) + math.cos(0.7))
    torch.testing.assert_close(last, x - r * v, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="call set_timesteps"):
        sched.step(v, 0.0, x)


def test_too_many_steps_and_bad_settings_are_refused():
    sched = FewStepScheduler(mid_times=(1.3, 1.0))
    with pytest.raises(ValueError, match="4 steps need 3 mid times"):
        sched.set_timesteps(4)
    with pytest.raises(ValueError, match="non-increasing"):
        FewStepScheduler(mid_times=(1.0, 1.3))


def test_plain_pipeline_call_runs_to_a_decoded_video(pipeline_and_student):
    """Without given latents the pipeline draws its own noise and the scheduler its own fresh noise; the
    tiny VAE decodes the result (the path a user takes)."""
    pipe, *_ = pipeline_and_student
    pipe.scheduler.noise = None
    video = pipe(
        prompt="a red fox", height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=1.0,
        max_sequence_length=TEXT_LEN, output_type="pt", generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip
    assert video.shape == (1, 5, 3, 32, 48) and torch.isfinite(video).all()
