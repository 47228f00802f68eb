"""Training: one bank of seeds per (method, regime, reward), exact expected reward after every step."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from .config import BanditConfig
from .env import REGIMES, REWARDS, bandit_reward, reference_policy
from .methods import ALL_METHODS, DFT_METHODS, POLICY_METHODS, method_loss
from .policies import make_policy, policy_probs

__all__ = ["train_seeds", "train_run", "eval_steps", "run_experiment"]


def _run_seed(seed: int, reward_name: str, regime: str) -> int:
    """Seed of a run's sampling stream: shared by all methods (common random numbers)."""
    return 1_000_003 * seed + 1_009 * list(REWARDS).index(reward_name) + 17 * REGIMES.index(regime) + 12_345


def train_seeds(method: str, regime: str, reward_name: str, seeds: Sequence[int], config: BanditConfig) -> dict:
    """Train one policy per seed (all in one bank) and record their exact expected rewards.

    Seed ``s`` draws its samples from its own generator, so its run does not depend on which
    other seeds share the bank; the result equals separate runs (bit for bit on the CPU kernel
    paths tried: AVX-512, AVX2, default).

    Returns:
        ``{"curves": [S, E] float64 (E[r] before step 0 and after every ``eval_every`` steps, see
        :func:`eval_steps`), "final_probs": [S, V] float64, "samples": actions drawn per seed}``.
    """
    from dftkern import DFTState

    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    if method not in ALL_METHODS:
        raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    # Why a bank trains each seed exactly as its own run: each seed's loss is a function of its own
    # logits only, a mean over its own G groups (the same 1/G as alone), and the bank sums them. And
    # everything is float64: Adam normalises every coordinate of the gradient, so rounding noise on
    # a coordinate whose exact gradient is ~0 (e.g. the logit of an action nobody sampled under
    # RLOO, whose advantages sum to 0) becomes a step of size up to ~lr; in float32, through the
    # fused ops, a bank and separate runs drifted apart by ~1e-5 in E[r] within a few steps.
    ref_probs = reference_policy()
    ref_log_probs = ref_probs.log()
    reward = bandit_reward(reward_name)
    generators = [torch.Generator().manual_seed(_run_seed(seed, reward_name, regime)) for seed in seeds]
    policy = make_policy(config.policy, ref_log_probs, seeds=seeds, hidden_size=config.hidden_size)
    optimizer = torch.optim.Adam(policy.parameters(), lr=config.lr)
    dft_state = DFTState(len(seeds) * config.groups) if method in DFT_METHODS else None

    per_seed_rows = config.groups * config.group_size
    curves = [policy_probs(policy) @ reward]
    samples = 0
    for step in range(config.steps):
        if step % config.reuse == 0:
            probs = ref_probs.expand(len(seeds), -1) if regime == "offline" else policy_probs(policy)
            actions = torch.stack(
                [torch.multinomial(probs[i], per_seed_rows, replacement=True, generator=g)
                 for i, g in enumerate(generators)]
            ).view(len(seeds), config.groups, config.group_size)
            rewards = reward[actions]
            samples += per_seed_rows
            # the sampler's log-probs: the token-level losses' importance ratios are taken against them
            sampler_log_probs = probs.log() if method in POLICY_METHODS else None
        loss = method_loss(method, policy, actions, rewards, ref_log_probs, config, dft_state,
                           old_log_probs=sampler_log_probs)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{method}/{regime}/{reward_name}: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            curves.append(policy_probs(policy) @ reward)
    return {"curves": torch.stack(curves, dim=1), "final_probs": policy_probs(policy), "samples": samples}


def train_run(method: str, regime: str, reward_name: str, seed: int, config: BanditConfig) -> dict:
    """One seed of :func:`train_seeds`: ``{"curve": [E] float64, "final_probs": [V], "samples"}``."""
    run = train_seeds(method, regime, reward_name, [seed], config)
    return {"curve": run["curves"][0], "final_probs": run["final_probs"][0], "samples": run["samples"]}


def eval_steps(config: BanditConfig) -> list[int]:
    """Gradient-step indices at which :func:`train_run` records the expected reward."""
    steps = [0] + [s for s in range(1, config.steps + 1) if s % config.eval_every == 0]
    if steps[-1] != config.steps:
        steps.append(config.steps)
    return steps


def run_experiment(config: BanditConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run every (method, regime, reward, seed) combination.

    Returns:
        ``{"config", "steps": [S] ints, "curves": {(method, regime, reward): [seeds, S]
        float64}, "final_probs": {key: [seeds, V] float64}, "samples": {key: int},
        "seconds": float}``.
    """
    config.validate()
    start = time.perf_counter()
    curves, finals, samples = {}, {}, {}
    for reward_name in config.rewards:
        for regime in config.regimes:
            for method in config.methods:
                run = train_seeds(method, regime, reward_name, range(config.seeds), config)
                key = (method, regime, reward_name)
                curves[key], finals[key], samples[key] = run["curves"], run["final_probs"], run["samples"]
                if progress is not None:
                    final = curves[key][:, -1]
                    progress(
                        f"{reward_name:>4} {regime:>9} {method:>7}: final E[r] = {final.mean():.3f} "
                        f"+- {final.std(unbiased=False):.3f}  ({time.perf_counter() - start:.1f} s)"
                    )
    return {
        "config": config,
        "steps": eval_steps(config),
        "curves": curves,
        "final_probs": finals,
        "samples": samples,
        "seconds": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
    }
