"""Does the SAC agent behind IGBv2 learn? Train it on Pendulum-v1 and compare with a random policy.

The agent is ``taskbalance.rl.SAC`` with a tanh squashing map into [−2, 2]: the very update code IGBv2 runs
with its softmax map. Prints a markdown table: episode return (mean ± std over evaluation episodes) of a
uniform random policy and of the trained deterministic policy, then the learning curve.

    pip install "taskbalance[rl]"        # gymnasium
    OMP_NUM_THREADS=2 python bench/sac_pendulum.py            # 10,000 steps; --steps for more

SAC usually reaches about −200 to −150 on Pendulum within 10–20k environment steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from taskbalance.rl import SAC, TanhSquash


def _gymnasium() -> Any:
    try:
        import gymnasium
    except ImportError as error:  # optional dependency
        raise SystemExit(
            'this benchmark needs gymnasium: pip install "taskbalance[rl]" (or pip install gymnasium)'
        ) from error
    return gymnasium


def evaluate(env: Any, policy: Callable[[torch.Tensor], torch.Tensor], episodes: int, seed: int) -> list[float]:
    """Undiscounted return of ``episodes`` full episodes, the i-th reset with seed + i."""
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            action = policy(torch.as_tensor(obs, dtype=torch.float32))
            obs, reward, terminated, truncated, _ = env.step(action.numpy())
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


def summary(returns: list[float]) -> str:
    return f"{statistics.mean(returns):8.1f} ± {statistics.stdev(returns):5.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000, help="environment steps of training")
    parser.add_argument("--start", type=int, default=1_000, help="uniform random actions before learning starts")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=2_000)
    parser.add_argument("--eval-episodes", type=int, default=5, help="episodes per learning-curve point")
    parser.add_argument("--final-episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gym = _gymnasium()
    env, eval_env = gym.make("Pendulum-v1"), gym.make("Pendulum-v1")
    low, high = float(env.action_space.low[0]), float(env.action_space.high[0])
    state_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    agent = SAC(state_dim, action_dim, TanhSquash(low, high), buffer_size=args.steps, seed=args.seed)
    explore = torch.Generator().manual_seed(args.seed + 1)

    def uniform(_: torch.Tensor) -> torch.Tensor:
        return low + (high - low) * torch.rand(action_dim, generator=explore)

    def greedy(obs: torch.Tensor) -> torch.Tensor:
        return agent.act(obs, deterministic=True)

    eval_seed = 10_000 + args.seed
    random_returns = evaluate(eval_env, uniform, args.final_episodes, eval_seed)

    curve: list[tuple[int, str, float, float]] = []
    obs, _ = env.reset(seed=args.seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        state = torch.as_tensor(obs, dtype=torch.float32)
        action = uniform(state) if step <= args.start else agent.act(state)
        obs, reward, terminated, truncated, _ = env.step(action.numpy())
        agent.store(state, action, float(reward), torch.as_tensor(obs, dtype=torch.float32), float(terminated))
        if terminated or truncated:
            obs, _ = env.reset()
        if step > args.start:
            agent.update(args.batch_size)
        if step % args.eval_every == 0:
            returns = evaluate(eval_env, greedy, args.eval_episodes, eval_seed)
            curve.append((step, summary(returns), float(agent.alpha), time.perf_counter() - start))
            print(f"step {step:6d}  return {curve[-1][1]}  alpha {curve[-1][2]:.3f}", flush=True)
    trained_returns = evaluate(eval_env, greedy, args.final_episodes, eval_seed)

    print(
        f"\nSAC on Pendulum-v1: {args.steps} steps ({args.start} random), seed {args.seed}, {torch.get_num_threads()} "
        f"threads, {time.perf_counter() - start:.0f} s\n"
    )
    print("| policy | episodes | return (mean ± std) |")
    print("|---|---|---|")
    print(f"| uniform random | {args.final_episodes} | {summary(random_returns)} |")
    print(f"| SAC, deterministic | {args.final_episodes} | {summary(trained_returns)} |")
    print("\n| env steps | return (mean ± std) | α | wall s |")
    print("|---|---|---|---|")
    for step, text, alpha, wall in curve:
        print(f"| {step} | {text} | {alpha:.3f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
