"""PyTorch baseline of the GPU check: tokens/s and MFU of pretraining SmolLM2-shaped models.

Each shape is the `safepipe train` preset's (vocabulary 49,153: SmolLM2's plus the tag), built
untrained from a config (no download), trained in bf16 with SDPA attention and fused AdamW at
sequence length 2048 for a few timed steps after warm-up. FLOPs per token are the same formula as
`LlamaConfig::flops_per_token` (6 x parameters + the attention term), MFU against the dense bf16
peak given (989 TFLOP/s for an H100/H200 SXM).

Usage: python3 scripts/gpu_baseline.py OUT.json [--peak 989e12] [--steps 10] [--compile]
"""

import argparse
import json
import sys
import time

PRESETS = {
    # name: (hidden, intermediate, layers, heads, kv heads, rope theta)
    "smollm2-135m": (576, 1536, 30, 9, 3, 100_000.0),
    "smollm2-360m": (960, 2560, 32, 15, 5, 100_000.0),
    "smollm2-1.7b": (2048, 8192, 24, 32, 32, 130_000.0),
}
VOCAB = 49_153
SEQ = 2048


def flops_per_token(params, layers, hidden, seq):
    return 6.0 * params + 12.0 * layers * hidden * seq / 2.0


def measure(name, micro_batch, steps, peak, compile_model):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, theta = PRESETS[name]
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, rope_theta=theta, tie_word_embeddings=True,
        max_position_embeddings=SEQ, attn_implementation="sdpa", torch_dtype=torch.bfloat16,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=True)
    step_fn = torch.compile(model) if compile_model else model
    tokens = torch.randint(0, VOCAB, (micro_batch, SEQ + 1), device="cuda")

    def step():
        out = step_fn(input_ids=tokens[:, :-1], labels=tokens[:, 1:])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_second = steps * micro_batch * SEQ / seconds
    fpt = flops_per_token(params, layers, hidden, SEQ)
    result = {
        "model": name, "parameters": params, "micro_batch": micro_batch, "seq_len": SEQ,
        "compiled": compile_model, "tokens_per_second": tokens_per_second,
        "flops_per_token": fpt, "mfu": tokens_per_second * fpt / peak,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "last_loss": float(loss),
    }
    del model, optimizer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--peak", type=float, default=989e12)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    import torch

    results = {"device": torch.cuda.get_device_name(0), "peak_flops": args.peak, "runs": []}
    for name, micro_batch in [("smollm2-135m", 16), ("smollm2-360m", 16), ("smollm2-1.7b", 8)]:
        try:
            run = measure(name, micro_batch, args.steps, args.peak, args.compile)
        except Exception as e:  # one shape failing (e.g. out of memory) must not lose the others
            run = {"model": name, "micro_batch": micro_batch, "error": repr(e)}
        print(json.dumps(run), flush=True)
        results["runs"].append(run)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
