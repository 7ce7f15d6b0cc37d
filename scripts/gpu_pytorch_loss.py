"""The GPU check's PyTorch comparison: our first-step loss against `transformers`.

`safepipe gpu bench --save DIR --json BENCH.json` writes DIR/init (the initial checkpoint in our
Hugging Face layout), DIR/batch.json (the first batch) and DIR/after (the checkpoint after the
run). This loads DIR/init as LlamaForCausalLM, computes the mean cross-entropy of the batch in
fp32 and in bf16, and compares it with the loss our trainer reported for that batch (target:
within 1e-2). DIR/after is loaded too, to show our GPU checkpoints open in `transformers`.

Usage: python3 scripts/gpu_pytorch_loss.py DIR BENCH.json OUT.json
"""

import json
import sys


def main():
    directory, bench_path, out_path = sys.argv[1:4]
    import torch
    from transformers import LlamaForCausalLM

    bench = json.load(open(bench_path))
    batch = json.load(open(f"{directory}/batch.json"))
    rows, seq = batch["rows"], batch["seq_len"]
    tokens = torch.tensor(batch["tokens"], dtype=torch.long).view(rows, seq + 1).cuda()
    result = {"ours": bench["first_loss"], "precision": bench["precision"]}
    for dtype, name in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]:
        model = LlamaForCausalLM.from_pretrained(f"{directory}/init", torch_dtype=dtype).cuda().eval()
        with torch.no_grad():
            logits = model(input_ids=tokens[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        result[f"pytorch_{name}"] = float(loss)
        del model
        torch.cuda.empty_cache()
    result["abs_diff_vs_fp32"] = abs(result["ours"] - result["pytorch_fp32"])
    result["within_1e-2"] = result["abs_diff_vs_fp32"] <= 1e-2
    after = LlamaForCausalLM.from_pretrained(f"{directory}/after", torch_dtype=torch.float32)
    result["after_loads_in_transformers"] = sum(p.numel() for p in after.parameters())
    print(json.dumps(result))
    json.dump(result, open(out_path, "w"), indent=2)


if __name__ == "__main__":
    sys.exit(main())
