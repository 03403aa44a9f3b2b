"""The sharded training state and networks: FSDP2 modules as the loop's denoisers, and their sCM tangent.

SPEC-rcm §8.7, §2.4-2.5. Two traps of torch.func over FSDP2 modules, and how this file stays clear of them:

1. `torch.func.jvp` through an FSDP2 module fails on torch 2.11: the pre-forward unshard allocates the
   all-gather output inside functorch's transform ("Cannot access storage of TensorWrapper"), even
   under no_grad; with grad enabled FSDP2 also applies an autograd.Function without a jvp rule
   (pytorch#182641). `sharded_scm_tangent` therefore propagates the tangent with forward-mode dual
   tensors (rcmfn.tangent.dual_jvp) under no_grad: FSDP2's hooks then run on plain tensors, its
   post-backward registration is skipped (no grad), every op's forward-AD formula is the one
   torch.func.jvp uses, and the attention and CP collectives carry tangents through their Autograd
   kernels. Guarded by tests/parallel/test_fsdp_cp.py (tangent == single-process torch.func.jvp).
2. `functional_call` on an FSDP2 module silently computes with the module's own unsharded parameters,
   whatever it is given. Sharded networks are therefore called as modules, and `sharded_velocity_net`
   raises if the parameters it receives are not the module's own (sharded) ones. Guarded by
   tests/parallel/test_fsdp_cp.py::test_sharded_net_refuses_foreign_parameters.
"""

from collections.abc import Callable, Mapping, Sequence

import torch
from tensordict import TensorDict
from torch import nn

from rcmfn.loop import LoopConfig, Networks, TrainState, adamw
from rcmfn.lora import adapter_pairs, fully_trained_keys
from rcmfn.lora_linear import adapter_key, is_adapter
from rcmfn.precond import Denoiser, trigflow_denoiser
from rcmfn.tangent import TangentMethod, dual_jvp, scm_tangent


def own_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters by name, as the optimiser, the EMA and checkpoints hold them (sharded
    DTensors after `apply_fsdp`). Call it outside a forward pass."""
    return dict(model.named_parameters())


def trainable_parameters(model: nn.Module, lora_full: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The parameters a network trains, as the optimiser, the EMA and checkpoints hold them: a network
    with LoRA adapters attached (rcmfn/lora_linear.py) trains those, keyed by the adapter-set convention
    (rcmfn/lora.py: "<weight key>.lora_down"), and the tensors `lora_full` (`LoraConfig.full`) trains in
    full beside them, under their own keys; any other network trains every parameter."""
    named = own_parameters(model)
    adapters = {adapter_key(name): p for name, p in named.items() if is_adapter(name)}
    if not adapters:
        return named
    shapes = {name: tuple(p.shape) for name, p in named.items() if not is_adapter(name)}
    full = fully_trained_keys(shapes, lora_full, list(adapter_pairs(adapters)))
    return adapters | {key: named[key] for key in full}


def sharded_velocity_net(model: nn.Module, timestep_scale: float, lora_full: Sequence[str] = ()) -> Callable:
    """net(params, x_in, c_noise, cond) -> v for a module whose parameters are FSDP-managed.

    The module is called directly (FSDP's hooks all-gather its parameters); `params` must be the
    module's own parameters (`own_parameters`), checked by identity, since passing other tensors
    cannot work (trap 2 in the module docstring); with adapters attached, the adapters
    (`trainable_parameters`: the frozen weights are the module's too). c_noise = 1000 r is rescaled
    to the net's timestep (1000 r for Wan, r for Cosmos: `timestep_scale` / 1000, SPEC-models §1).
    """
    own = tuple(trainable_parameters(model, lora_full).values())
    scale = timestep_scale / 1000.0

    def net(params: Mapping[str, torch.Tensor], x_in: torch.Tensor, c_noise: torch.Tensor, cond) -> torch.Tensor:
        given = tuple(params.values())
        if len(given) != len(own) or any(a is not b for a, b in zip(given, own, strict=True)):
            raise ValueError(
                "a sharded network computes with its own FSDP-managed parameters; pass those "
                "(parallel.fsdp.own_parameters), not copies or other tensors"
            )
        timestep = c_noise * scale if scale != 1.0 else c_noise
        return model(x_in, timestep, cond)

    return net


def sharded_scm_tangent(
    denoise: Denoiser,
    params,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond,
    teacher_velocity: torch.Tensor,
    method: TangentMethod = "jvp",
    fd_step: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rcmfn.tangent.scm_tangent` for a sharded student: same contract, tangent by `dual_jvp`.

    SPEC-rcm §2.4-2.5. "fd" needs no derivative and is `scm_tangent` itself.
    """
    # no_grad (inside scm_tangent) is required, not only cheaper: FSDP2's grad-mode hooks have no jvp rule
    return scm_tangent(denoise, params, x_t, t, cond, teacher_velocity, method, fd_step, jvp_fn=dual_jvp)


def init_sharded_state(
    student: nn.Module, fake: nn.Module | None, cfg: LoopConfig, lora_full: Sequence[str] = ()
) -> TrainState:
    """`rcmfn.loop.init_state` for FSDP modules: the state holds the modules' own sharded trainable
    parameters (`trainable_parameters`; not copies: the optimiser must step what FSDP all-gathers), an
    fp32 EMA sharded like them, and a AdamW per network (the loop measures the raw gradient norm,
    rcmfn.divergence); the AdamW is the loop's own (`rcmfn.loop.adamw`, fused)."""
    student_params = TensorDict(trainable_parameters(student, lora_full), batch_size=[])
    fake_params = None if fake is None else TensorDict(trainable_parameters(fake, lora_full), batch_size=[])
    for module, params in ((student, student_params), (fake, fake_params)):
        trained = set() if params is None else {id(p) for p in params.values()}
        for p in [] if module is None else module.parameters():  # LoRA: the frozen weights get no gradient
            p.requires_grad_(id(p) in trained)
    return TrainState(
        iteration=0,
        student=student_params,
        ema=student_params.apply(lambda p: p.detach().float().clone()),
        student_opt=adamw(student_params, cfg.optim.student_lr, cfg.optim),
        fake=fake_params,
        fake_opt=None if fake is None else adamw(fake_params, cfg.optim.fake_lr, cfg.optim),
    )


def sharded_networks(
    student: nn.Module,
    teacher: nn.Module,
    fake: nn.Module | None,
    timestep_scale: float,
    cfg: LoopConfig,
    time_dtype: torch.dtype | None = None,
    lora_full: Sequence[str] = (),
) -> Networks:
    """The loop's Networks over FSDP modules: denoisers that call the modules, the frozen teacher's
    own parameters, and the dual-number tangent (trap 1). `time_dtype`: see trigflow_denoiser;
    `lora_full`: see `trainable_parameters` (what `init_sharded_state` was given)."""
    for p in teacher.parameters():
        p.requires_grad_(False)
    velocity = lambda m: sharded_velocity_net(m, timestep_scale, lora_full)  # noqa: E731
    wrap = lambda m: trigflow_denoiser(velocity(m), time_dtype=time_dtype)  # noqa: E731
    student_denoiser = wrap(student)
    loss = cfg.loss
    return Networks(
        student=student_denoiser,
        teacher=wrap(teacher),
        teacher_params=TensorDict(own_parameters(teacher), batch_size=[]),
        fake=None if fake is None else wrap(fake),
        student_tangent=lambda p, x, t, c, f: sharded_scm_tangent(
            student_denoiser, p, x, t, c, f, loss.tangent_method, loss.fd_step
        ),
    )
