"""One rank of tests/test_sampling.py's FSDP check (torchrun --nproc_per_node=2); writes OUT/rank{r}.json.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/sampling_fsdp_worker.py OUT

The tiny Qwen2.5-VL (random weights, the same on both ranks) is sharded with FSDP2 as train.py
shards it. Then, on every rank:
1. the same prompt sampled with the same seed (both ranks must get the same tokens);
2. sampling and greedy decoding (generate_completions and evaluate.decode_boxes) where a hook on the
   LM head makes rank 0's completions end at step 3 (EOS forced) and rank 1's run to the limit (EOS
   forbidden). Without synced decoding rank 0 would stop calling forward and rank 1 would wait
   forever in its next weight all-gather.
"""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
from evaluate import decode_boxes  # noqa: E402
from grpo_min import dist, tiny  # noqa: E402
from grpo_min.prompts import CHAIN_OF_BOX, encode_prompts, special_token_ids  # noqa: E402
from grpo_min.rollout import completion_logps, generate_completions  # noqa: E402

LIMIT, RANK0_LENGTH = 10, 3


def main():
    out = Path(sys.argv[1])
    dist.setup()
    rank = dist.rank()
    processor = tiny.build_processor()
    model = dist.wrap(tiny.build_model(processor, seed=0), fsdp=True)
    eos = special_token_ids(processor)["eos"]
    sample = data.synthetic_sample(rank, "val")  # each rank its own prompt for part 2
    image = sample.load_image()
    own = encode_prompts(processor, [image], [sample.text], CHAIN_OF_BOX)
    with torch.no_grad():  # one forward through the root first, as train.py does
        completion_logps(model, own, own.inputs["input_ids"][:, -1:], torch.ones(1, 1), group_size=1)
    model.reshard()
    result = {}

    # 1. The same prompt and seed on both ranks.
    shared = data.synthetic_sample(7, "val")
    same = encode_prompts(processor, [shared.load_image()], [shared.text], CHAIN_OF_BOX)
    torch.manual_seed(0)
    result["same_prompt"] = generate_completions(model, processor, same, num_generations=2, max_new_tokens=LIMIT,
                                                 synced_gpus=True).completion_ids.tolist()

    # 2. Rank 0 ends at step 3, rank 1 runs to the limit.
    calls = [0]

    def steer(module, args, logits):  # the LM head's output, (rows, 1, V); call 1 is the prompt pass
        calls[0] += 1
        if rank == 0 and calls[0] == RANK0_LENGTH:
            logits[..., eos[0]] = 1e4
        if rank == 1:
            logits[..., eos] = float("-inf")
        return logits

    model.lm_head.register_forward_hook(steer)
    for key, greedy in (("sampled", False), ("greedy", True)):
        calls[0] = 0
        result[key] = generate_completions(model, processor, own, num_generations=2, max_new_tokens=LIMIT,
                                           greedy=greedy, synced_gpus=True).completion_ids.tolist()
    calls[0] = 0
    result["answers"] = decode_boxes(model, processor, [image], [sample.text], [image.size], CHAIN_OF_BOX,
                                     max_new_tokens=LIMIT, synced_gpus=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.cleanup()


if __name__ == "__main__":
    main()
