"""Run an exported model in the engine that serves it, and return what it computes.

This file is also a standalone script (it imports nothing from lotaqaf), so that `lotaqaf export` can
run it with another interpreter, one whose venv has the engine (`export.check_python`, set up by
`make check-serving`); serving/engines.py runs it, serving/probe.py uses its torch loop for lotaqaf's
own side of the comparison:

    python child.py KIND EXPORT_DIR PROBE.json OUT.npz

PROBE.json: {"prompts": [[token ids]...], "continuations": [[token ids]...]}: the prompts and
lotaqaf's greedy continuations of them. For each prompt the engine produces its own greedy
continuation of the same length (no sampling, no stop token) and, teacher-forced on the prompt and
lotaqaf's continuation, the logits that predict each continuation token. OUT.npz holds
`greedy_<i>` (int64 [n]), `logits_<i>` (float32 [n, vocab]), `engine` (a string) and `extra` (JSON:
e.g. llama.cpp's own tokenization of the prompt texts, when PROBE.json has "texts").
Exit status 3 and one line on stderr when the engine is not installed in this interpreter.

KIND          engine (what it loads from EXPORT_DIR)
llama_cpp     llama-cpp-python: model.gguf
transformers  transformers AutoModelForCausalLM.from_pretrained(EXPORT_DIR), float32
gguf_transformers  transformers' GGUF loader: model.gguf, dequantized to float32
gptqmodel_peft     gptqmodel (torch kernel) on EXPORT_DIR and PEFT's LoRA from EXPORT_DIR/offset_lora
gptqmodel          gptqmodel alone (a GPTQ export without an offset branch)
transformers_bnb_peft  transformers with bitsandbytes quantizing EXPORT_DIR's 16-bit weights to NF4 as it loads
                   (the settings in EXPORT_DIR/lotaqaf_nf4.json) and PEFT's LoRA from EXPORT_DIR/offset_lora:
                   how a QLoRA model is served
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

EXIT_MISSING = 3   # the exit status when the engine is not installed in this interpreter


class EngineMissing(Exception):
    pass


def greedy_continuations(forward, prompts, n: int):
    """Greedy continuations of ``n`` tokens; ``forward(ids [1, T])`` returns float logits [T, vocab].
    Each step recomputes the whole sequence (no cache): the engine's own forward, nothing else."""
    import torch

    out = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(forward(torch.tensor([ids]))[-1].argmax()))
        out.append(ids[len(prompt):])
    return out


def forced_logits(forward, prompts, continuations):
    """Per prompt, teacher-forced on the prompt and the continuation: the logits predicting each
    continuation token ([n, vocab])."""
    import torch

    return [forward(torch.tensor([list(p) + list(c[:-1])]))[len(p) - 1:].float().cpu()
            for p, c in zip(prompts, continuations, strict=True)]


def torch_probe(forward, prompts, continuations):
    greedy = greedy_continuations(forward, prompts, len(continuations[0]))
    return greedy, [lg.numpy() for lg in forced_logits(forward, prompts, continuations)]


def hf_forward(model):
    import torch

    def forward(ids):
        with torch.no_grad():
            return model(input_ids=ids.to(model.device)).logits[0].float().cpu()

    return forward


def llama_cpp_without_extra_buffers() -> None:
    """Models loaded after this call get no extra buffer types (weight repacking): llama.cpp's AMX path for
    them segfaults on CPUs with AMX in some environments (gdb: ggml_backend_amx_mul_mat, 2026-12-05); its
    plain SIMD path runs instead."""
    import llama_cpp.llama_cpp as llama_c

    defaults = llama_c.llama_model_default_params

    def model_params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    llama_c.llama_model_default_params = model_params


def run_llama_cpp(path: Path, prompts, continuations, texts=None):
    import numpy as np

    try:
        import llama_cpp
    except ImportError:
        raise EngineMissing("llama-cpp-python is not installed (make check-serving builds it)") from None
    llama_cpp_without_extra_buffers()
    n_ctx = max(len(p) + len(c) for p, c in zip(prompts, continuations, strict=True)) + 8
    llm = llama_cpp.Llama(model_path=str(path / "model.gguf"), n_ctx=n_ctx, n_batch=n_ctx, n_threads=os.cpu_count() or 1,
                          logits_all=True, verbose=False, seed=0)
    greedy, logits = [], []
    for prompt, cont in zip(prompts, continuations, strict=True):
        llm.reset()
        llm.eval(list(prompt))
        out = []
        for _ in range(len(cont)):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        greedy.append(out)
        llm.reset()
        llm.eval(list(prompt) + list(cont[:-1]))
        logits.append(np.array(llm.scores[len(prompt) - 1:llm.n_tokens], dtype=np.float32))
    extra = {}
    if texts:  # the GGUF's tokenizer metadata, in llama.cpp's own tokenizer
        same = sum(llm.tokenize(t.encode(), add_bos=False, special=False) == list(p) for t, p in zip(texts, prompts, strict=True))
        extra["tokenizer_same_ids"] = int(same)
    return greedy, logits, f"llama-cpp-python {llama_cpp.__version__}", extra


def run_transformers(path: Path, prompts, continuations, gguf: bool = False):
    import torch
    import transformers

    kw = {"gguf_file": "model.gguf"} if gguf else {}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()
    except ImportError as e:  # the format's library (torchao, gguf) is missing here
        raise EngineMissing(str(e).splitlines()[0]) from None
    g, lg = torch_probe(hf_forward(model), prompts, continuations)
    classes = sorted({type(m.weight).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)})
    quant = getattr(model.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = getattr(method, "value", method)
    engine = f"transformers {transformers.__version__}" + (" (GGUF loader)" if gguf else f" ({method})" if method else "")
    return g, lg, engine, {"linear_weight_classes": classes}


def run_gptqmodel(path: Path, prompts, continuations, with_peft: bool):
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gptqmodel
        import optimum  # noqa: F401  (peft's gptqmodel support needs it)
        import peft
        from gptqmodel import BACKEND, GPTQModel
    except ImportError:
        raise EngineMissing("gptqmodel, optimum and peft are not installed (make check-serving installs them)") from None
    import torch
    from safetensors.torch import load_file

    # gptqmodel's torch kernel loads in float16; .float() then runs it in float32 (its fp16 scales
    # exact), and the checkpoint's float32 embeddings and norms, rounded by the fp16 load, are put back.
    base = GPTQModel.load(str(path), backend=BACKEND.GPTQ_TORCH, device="cpu", dtype=torch.float16)
    model = base.model.float()  # the transformers model inside (PEFT must wrap this, not the GPTQModel)
    dense = {}
    for f in sorted(path.glob("*.safetensors")):
        dense.update({k: v for k, v in load_file(str(f)).items() if v.is_floating_point() and k.endswith(".weight")})
    unexpected = model.load_state_dict(dense, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"unexpected tensors {unexpected[:3]}")
    engine = f"gptqmodel {gptqmodel.__version__} (torch kernel, float32)"
    if with_peft:
        model = peft.PeftModel.from_pretrained(model, str(path / "offset_lora"))
        engine += f" + peft {peft.__version__}"
    g, lg = torch_probe(hf_forward(model.eval()), prompts, continuations)
    return g, lg, engine, {}


def run_transformers_bnb_peft(path: Path, prompts, continuations):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import bitsandbytes
        import peft
        import transformers
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError:
        raise EngineMissing("transformers, bitsandbytes and peft are not all installed") from None
    import torch

    nf4 = json.loads((path / "lotaqaf_nf4.json").read_text())
    dtype = getattr(torch, nf4["compute_dtype"])
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                bnb_4bit_use_double_quant=nf4["double_quant"],
                                llm_int8_skip_modules=nf4["skip_modules"])
    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=config, device_map="cpu", dtype=dtype)
    model = peft.PeftModel.from_pretrained(model, str(path / "offset_lora"))
    engine = (f"transformers {transformers.__version__} + bitsandbytes {bitsandbytes.__version__} (NF4) "
              f"+ peft {peft.__version__}")
    g, lg = torch_probe(hf_forward(model.eval()), prompts, continuations)
    return g, lg, engine, {}


def run(kind: str, path: Path, prompts, continuations, texts=None):
    """(greedy continuations, teacher-forced logits, the engine and its version, other findings)."""
    if kind == "llama_cpp":
        return run_llama_cpp(path, prompts, continuations, texts)
    if kind in ("gptqmodel_peft", "gptqmodel"):
        return run_gptqmodel(path, prompts, continuations, with_peft=kind == "gptqmodel_peft")
    if kind in ("transformers", "gguf_transformers"):
        return run_transformers(path, prompts, continuations, gguf=kind == "gguf_transformers")
    if kind == "transformers_bnb_peft":
        return run_transformers_bnb_peft(path, prompts, continuations)
    raise ValueError(kind)


def main(argv: list[str]) -> int:
    import numpy as np

    kind, path, probe_file, out_file = argv
    probe = json.loads(Path(probe_file).read_text())
    try:
        greedy, logits, engine, extra = run(kind, Path(path), probe["prompts"], probe["continuations"],
                                            probe.get("texts"))
    except EngineMissing as e:
        print(str(e), file=sys.stderr)
        return EXIT_MISSING
    arrays = {f"greedy_{i}": np.array(g, dtype=np.int64) for i, g in enumerate(greedy)}
    arrays.update({f"logits_{i}": lg for i, lg in enumerate(logits)})
    tmp = Path(out_file).with_suffix(".part.npz")
    np.savez(tmp, engine=np.array(engine), extra=np.array(json.dumps(extra)), **arrays)
    tmp.rename(out_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
