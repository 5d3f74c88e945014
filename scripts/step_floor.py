"""How short a GRPO step can get next to its generation, from the arithmetic alone (issue 7).

    python scripts/step_floor.py --model-config 50m --image-size 224
    python scripts/step_floor.py --model-config tiny --image-size 448 --max-completion-length 128

Takes the benchmark's options (``python scripts/bench.py --help``) and, on one rollout of that
configuration:

1. counts the floating-point operations of the passes a step runs after sampling (the reference
   forward and the policy's forward and backward, as ``completion_logps`` runs them) and of the
   sampling itself, with torch's ``FlopCounterMode`` (matrix products, convolutions, attention);
2. measures the best rate this machine's matrix products reach, on the model's own shapes;
3. times the sampling call and the scoring passes (median of ``--steps`` repeats), and measures with
   torch's profiler how long the scoring passes spend inside matrix-product kernels alone.

The floor of step / generate is (generate + scoring FLOPs / best rate) / generate: what a step would
take if the scoring passes ran at the machine's best matrix-product speed with no other cost, and
the optimizer took no time. When the floor is above a target, no reordering of the same work meets
the target on this machine; only less work (fewer tokens, a frozen tower) or faster arithmetic can.
The second, measured floor is (generate + matrix-product kernel time of the scoring passes) /
generate: what the step would take if everything in those passes but their matrix products (norms,
activations, attention, copies, Python) cost nothing, with this machine's BLAS doing the products.
"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402  (scripts/bench.py)
from grpo_min.prompts import CHAIN_OF_BOX  # noqa: E402
from grpo_min.rollout import completion_logps, encode_prompts, generate_completions, special_token_ids  # noqa: E402


def best_matmul_gflops(config, tokens: int, repeats: int = 10) -> float:
    """The highest GFLOP/s of fp32 matrix products shaped like the model's linear layers."""
    text, vision = config.text_config, config.vision_config
    shapes = [(tokens, text.hidden_size, text.intermediate_size), (tokens, text.intermediate_size, text.hidden_size),
              (tokens, vision.hidden_size, vision.intermediate_size)]
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - t0) / 1e9)
    return best


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def matmul_kernel_seconds(fn) -> float:
    """Wall seconds ``fn()`` spends inside matrix-product kernels (profiler self time, this thread)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMUL_OPS) / 1e6


def main():
    args = bench.parse_args()
    torch.manual_seed(args.seed)
    policy, reference, processor = bench.load_models(args, torch.device("cpu"))
    G = args.num_generations
    images = [bench.synthetic_image(args.image_size, args.seed + i) for i in range(args.batch_size)]
    prompts = encode_prompts(processor, images, [bench.PHRASES[i % 3] for i in range(len(images))], CHAIN_OF_BOX)
    kw = dict(group_size=G, temperature=args.temperature, never_ids=special_token_ids(processor)["never"])

    def generate():
        return generate_completions(policy, processor, prompts, num_generations=G,
                                    max_new_tokens=args.max_completion_length, temperature=args.temperature)

    def score(rollout):
        if reference is not None:
            with torch.no_grad():
                completion_logps(reference, prompts, rollout.completion_ids, rollout.completion_mask, **kw)
        logps = completion_logps(policy, prompts, rollout.completion_ids, rollout.completion_mask, **kw)
        (logps * rollout.completion_mask).sum().backward()  # the loss's backward costs the same passes
        policy.zero_grad(set_to_none=True)

    rollout = generate()  # warm-up, and the completions every count below uses
    with FlopCounterMode(display=False) as counter:
        generate()
    generate_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        score(rollout)
    scoring_flops = counter.get_total_flops()

    gen_s, score_s = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        generate()
        t1 = time.perf_counter()
        score(rollout)
        gen_s.append(t1 - t0)
        score_s.append(time.perf_counter() - t1)
    gen_t, score_t = statistics.median(gen_s), statistics.median(score_s)
    matmul_t = statistics.median(matmul_kernel_seconds(lambda: score(rollout)) for _ in range(3))
    scored_tokens = prompts.inputs["input_ids"].numel() + rollout.completion_ids.numel()
    peak = best_matmul_gflops(policy.config, scored_tokens)
    floor_t = scoring_flops / 1e9 / peak
    result = {
        "generate_s": round(gen_t, 4), "generate_gflop": round(generate_flops / 1e9, 2),
        "scoring_s": round(score_t, 4), "scoring_gflop": round(scoring_flops / 1e9, 2),
        "scoring_gflop_per_s": round(scoring_flops / 1e9 / score_t, 1), "best_matmul_gflop_per_s": round(peak, 1),
        "scoring_floor_s": round(floor_t, 4), "step_over_generate_floor": round((gen_t + floor_t) / gen_t, 3),
        "scoring_matmul_kernel_s": round(matmul_t, 4),
        "step_over_generate_matmul_only": round((gen_t + matmul_t) / gen_t, 3),
        "step_over_generate_without_optimizer": round((gen_t + score_t) / gen_t, 3),
        "model": args.model or args.model_config, "image_size": args.image_size, "num_generations": G,
        "max_completion_length": args.max_completion_length, "beta": args.beta,
        "completion_tokens": int(rollout.completion_mask.sum()), "torch_threads": torch.get_num_threads(),
    }
    print(f"generate: {gen_t:.3f} s for {generate_flops / 1e9:.1f} GFLOP; scoring passes: {score_t:.3f} s for "
          f"{scoring_flops / 1e9:.1f} GFLOP ({scoring_flops / 1e9 / score_t:.0f} GFLOP/s; matrix products reach "
          f"{peak:.0f} GFLOP/s here)")
    print(f"scoring passes: {matmul_t:.3f} s inside matrix-product kernels, {score_t - matmul_t:.3f} s elsewhere")
    print(f"step / generate: at least {(gen_t + floor_t) / gen_t:.2f} from the arithmetic alone at the best rate; "
          f"{(gen_t + matmul_t) / gen_t:.2f} with only the scoring passes' matrix products as measured; "
          f"{(gen_t + score_t) / gen_t:.2f} measured without the optimizer")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
