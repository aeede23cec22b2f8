"""Memory one case of a parallel edit needs, computed from model shapes (no weights are loaded).

For FT-M, LoRA (AdaLoRA as configured by default, and plain LoRA) and ROME on the embedded model
(SmolLM2-135M: 30 layers, hidden 576, MLP 1536, 9 heads of 64, 3 key-value heads, vocabulary 49152)
and on a Llama-2-7B shape (32 layers, hidden 4096, MLP 11008, 32 heads of 128, vocabulary 32000), in
float32 and bfloat16. ``state`` is exact: the per-case change, its gradient, Adam's two moments and the
temporaries of its update, and the change kept for evaluation; ``once``: what a window needs once (the
float32 copy of the head in bfloat16). ``activations`` is an upper estimate of what autograd keeps for one
training step of one 32-token edit (``ModelShape.step_activations``); ``wild``: what evaluating a case in the
wild protocol holds (``ModelShape.reply_cache``: 5 probes of a 32-token bare prompt and a 50-token reply),
which comes after the training step, so a case needs its state and the larger of the two. ``--parallel
auto`` divides half the free memory by the total of the run's protocol.

    python benchmarks/parallel_memory.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from overtone.editors import ft_m, lora, rome
from overtone.editors.locate import LocateConfig
from overtone.editors.lora import LoRAConfig
from overtone.editors.parallel import CaseMemory, ModelShape
from overtone.evaluation.wild import WildSettings, reply_memory

SHAPES = {
    "SmolLM2-135M": (LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                 num_key_value_heads=3, vocab_size=49152), 7),
    "Llama-2-7B shape": (LlamaConfig(), 5),  # LlamaConfig's defaults are Llama-2-7B's
}


def mib(n: int) -> str:
    return f"{n / 2**20:9.1f}"


def main() -> None:
    print(f"{'model':<18}{'dtype':<10}{'editor':<18}{'state MiB':>10}{'activ. MiB':>11}{'total MiB':>10}"
          f"{'once MiB':>10}{'wild MiB':>10}{'total wild':>11}")
    for name, (config, rome_layer) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            shape = ModelShape.of(config, dtype)
            layer = ft_m.default_layer(shape.layers)
            wild = reply_memory(shape, WildSettings().max_new_tokens)
            rows: dict[str, CaseMemory] = {
                f"FT-M (layer {layer})": ft_m.case_memory(shape, layer),
                "AdaLoRA (q, v)": lora.case_memory(shape, LoRAConfig()),
                "LoRA r=8 (q, v)": lora.case_memory(shape, LoRAConfig(variant="lora")),
                f"ROME (layer {rome_layer})": rome.case_memory(shape, LocateConfig(), rome_layer),
            }
            for editor, memory in rows.items():
                print(f"{name:<18}{str(dtype).removeprefix('torch.'):<10}{editor:<18}{mib(memory.state):>10}"
                      f"{mib(memory.activations):>11}{mib(memory.total):>10}{mib(memory.shared):>10}"
                      f"{mib(wild):>10}{mib(memory.state + max(memory.activations, wild)):>11}")


if __name__ == "__main__":
    main()
