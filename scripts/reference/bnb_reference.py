"""Records a bitsandbytes-serialised 4-bit checkpoint, as transformers + bitsandbytes write it,
into model/tests/fixtures/llama-bnb4/. CI does not run this script.

    /var/tmp/loraops-py/bin/python scripts/reference/bnb_reference.py

The directory holds:
- source/: a tiny Llama in f32 (config.json, model.safetensors): what `loraops model quantize`
  is given in the test;
- nf4-dq/ and nf4/: `from_pretrained(source, load_in_4bit, nf4, double quant on / off)` then
  `save_pretrained`: the `*-bnb-4bit` form users download (packed codes, absmax, quant_map,
  nested_absmax, nested_quant_map, quant_state.bitsandbytes__nf4);
- reference.safetensors: input ids and each quantised model's f32 logits (eager attention).

The shapes leave partial 64-value blocks (72 x 100) and more than one 256-block of absmax
values (300 x 72), so every edge of the layout shows.
"""

import math
import os
import shutil

import bitsandbytes
import torch
import transformers
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "model", "tests", "fixtures", "llama-bnb4")
VOCAB = 96
SEQ = 20


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    cfg = transformers.LlamaConfig(hidden_size=72, intermediate_size=300, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape) / math.sqrt(p.shape[1]))
    source = os.path.join(OUT, "source")
    model.save_pretrained(source)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(8))
    reference = {"input_ids": ids.to(torch.int64)}
    for name, double in (("nf4-dq", True), ("nf4", False)):
        bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=double,
                                             bnb_4bit_compute_dtype=torch.float32)
        q = transformers.AutoModelForCausalLM.from_pretrained(
            source, quantization_config=bnb, dtype=torch.float32, device_map="cpu",
            attn_implementation="eager")
        q.eval()
        q.save_pretrained(os.path.join(OUT, name))
        # bitsandbytes' CPU fast path (AVX512-BF16 machines) repacks the weights and computes in
        # bf16; the reference is the plain dequantise-then-matmul in f32.
        for m in q.modules():
            if isinstance(m, bitsandbytes.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            reference[f"logits.{name}"] = q(input_ids=ids).logits.contiguous()
    for d in ("source", "nf4-dq", "nf4"):
        gen = os.path.join(OUT, d, "generation_config.json")
        if os.path.exists(gen):
            os.remove(gen)
    save_file(reference, os.path.join(OUT, "reference.safetensors"),
              metadata={"transformers": transformers.__version__,
                        "bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__})
    for root, _, files in sorted(os.walk(OUT)):
        for f in sorted(files):
            print(os.path.relpath(os.path.join(root, f), OUT), os.path.getsize(os.path.join(root, f)))


if __name__ == "__main__":
    main()
