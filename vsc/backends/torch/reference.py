"""The reference a lowered runner is held to: Hugging Face transformers in fp32, on fixed probes.

Shared by the accuracy check (vsc.backends.torch.accuracy) and the json-mode check
(vsc.backends.torch.constrained_check): the probe prompts, their token ids, the reference
model (loaded once per process) and its teacher-forced logits, and the default tolerance
by plan dtype (measured: see vsc.backends.torch.accuracy).
"""
from __future__ import annotations

from pathlib import Path

import torch

from vsc.ir.gguf_import import is_gguf_path

#: Default tolerance (when the plan's accuracy bar gives none), by plan dtype.
DEFAULT_TOLERANCE = {"f32": 1e-3, "f16": 5e-2, "bf16": 0.25}


#: Probe prompts: English and code, short to long (several are longer than a 16-token
#: block). Probe k uses text k; past the end of the list, two texts are joined.
PROBE_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog, and then it runs back into the forest to find its family before night falls.",
    "Hello! How are you?",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "In the beginning of the twentieth century, physicists discovered that light behaves both as a wave and as a particle. "
    "This strange duality led to the development of quantum mechanics, a theory that describes the behaviour of matter "
    "and energy at the smallest scales. Today it underpins lasers, transistors and the computers we use every day.",
    "Write a haiku about autumn leaves.",
    "#include <stdio.h>\n\nint main(void) {\n    int total = 0;\n    for (int i = 1; i <= 10; i++) {\n"
    "        total += i * i;\n    }\n    printf(\"%d\\n\", total);\n    return 0;\n}\n",
    "Q: What is the capital of France?\nA: Paris.\nQ: What is the capital of Japan?\nA:",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON orders.customer_id = customers.id "
    "GROUP BY name ORDER BY orders DESC LIMIT 10;",
    "Once upon a time",
    "{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"Summarize the report in three bullet points.\"}], \"temperature\": 0}",
    "The mitochondria is the powerhouse of the cell; it turns nutrients into the energy that keeps every living thing going.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n\n"
    "    def pop(self):\n        return self.items.pop()\n",
)


def probe_texts(count: int) -> list[str]:
    """The first `count` probe prompts (deterministic)."""
    out = []
    n = len(PROBE_TEXTS)
    for k in range(count):
        if k < n:
            out.append(PROBE_TEXTS[k])
        else:
            out.append(PROBE_TEXTS[k % n] + "\n" + PROBE_TEXTS[(k // n + k) % n])
    return out


_REFERENCES: dict[str, torch.nn.Module] = {}


def reference_model(model_dir: str | Path) -> torch.nn.Module:
    """The HF transformers model of `model_dir` in fp32, loaded once per process (a GGUF file:
    its model with the blocks dequantized)."""
    key = str(Path(model_dir).resolve())
    model = _REFERENCES.get(key)
    if model is None and is_gguf_path(key):      # a GGUF plan is checked against its dequantized model
        from vsc.models.gguf_import import dequantized_model
        model = _REFERENCES[key] = dequantized_model(Path(key))
    if model is None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        model.eval()
        _REFERENCES[key] = model
    return model


@torch.inference_mode()
def reference_logits(model: torch.nn.Module, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """Reference logits [len(generated), V] predicting each generated token, teacher-forced on
    prompt + generated (row j is what the reference predicts after prompt + generated[:j])."""
    if not generated:
        return torch.zeros(0, model.config.vocab_size)
    ids = torch.tensor([prompt + generated[:-1]], dtype=torch.long)
    logits = model(input_ids=ids).logits[0].to(torch.float32)
    return logits[len(prompt) - 1:]


def tokenize_probes(model_dir: str | Path, count: int, limit: int) -> list[list[int]]:
    """Token ids of the first `count` probe prompts, each cut to at most `limit` tokens."""
    from vsc.runtime.tokenizer import read_tokenizer_json
    if is_gguf_path(model_dir):
        from vsc.models.gguf_import import companion_dir
        model_dir = companion_dir(Path(model_dir))
    tok = read_tokenizer_json(model_dir, needed_for="the accuracy check tokenizes probes with it")
    return [tok.encode(text).ids[:limit] or [0] for text in probe_texts(count)]
