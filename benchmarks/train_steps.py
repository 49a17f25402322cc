"""The MAMO training steps the benchmarks time and count (bench_train_step.py, step_cost.py,
profile_train_step.py): configs, the paths each device runs, and a step built as train.py builds it."""
import dataclasses

import torch

from timing import cuda_config
from vlfast.data.synthetic import SPECIAL_TOKENS, WORDS
from vlfast.models import Mamo, MamoConfig, TextConfig, VisionConfig
from vlfast.trainer import (CudaGraphStep, OptimConfig, bf16_weights, compile_forward_backward, default_model,
                            forward_backward, make_optimizer, train_step)

VIT_B16_BERT_BASE = MamoConfig(vision=VisionConfig(), text=TextConfig(), embed_dim=256)
CONFIGS = {  # name: (model, batch)
    "tiny": (default_model(), 32),
    "vit_b16_bert_base_224_b64": (VIT_B16_BERT_BASE, 64),
    "vit_b16_bert_base_256_b32": (MamoConfig(vision=VisionConfig(image_size=256), text=TextConfig(), embed_dim=256), 32),
}
TEXT_LENGTH = 30
# "auto", not "fused": under pytest on a CPU, TRITON_INTERPRET=1 would make "fused" run the
# Triton kernels in the interpreter; auto is what `python train.py` runs on either device.
# fused_compiled: train.py's compile=true (forward, backward and clipping as one inductor graph; the
# first call compiles, before any timing); with cuda_graph, the two combined.
BACKENDS = {"fused": "auto", "reference": "reference", "fused_cuda_graph": "auto", "fused_compiled": "auto",
            "fused_compiled_cuda_graph": "auto"}


def implementations(device: str):
    """What runs on ``device``: graphs need CUDA; on CUDA the compiled step is timed graphed only (the
    combination train.py's GPU configs are for; each compile costs a lease a minute or more)."""
    if device == "cuda":
        return ["fused", "reference", "fused_cuda_graph", "fused_compiled_cuda_graph"]
    return ["fused", "reference", "fused_compiled"]


def build_step(config_name: str, device: str, implementation: str = "fused", batch: int = None,
               autocast: bool = None):
    """(step function, batch size): a fresh model, its AdamW and one random batch (of the config's
    size unless ``batch``), fixed seeds. Reads VLFAST_BACKEND at each call; set it to
    BACKENDS[implementation]. ``autocast``: whether the step runs under bf16 autocast (as
    train.py's on a GPU; default: in the CUDA configuration, timing.cuda_config), which the model is
    prepared for as train.py does; on the CPU the step then runs under the CPU's autocast. The
    step function's ``forward_backward_args`` are what train.py's compiled part takes (step_cost.py
    explains it)."""
    config, config_batch = CONFIGS[config_name]
    batch = batch or config_batch
    if config.text.vocab_size == 0:  # train.py's default takes its vocabulary from the synthetic set
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=len(SPECIAL_TOKENS) + len(WORDS)))
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: ViT-B + BERT-base take seconds on the host
        model = Mamo(config, mask_token_id=4, special_ids=[0, 2, 3])
    autocast = cuda_config(device) if autocast is None else autocast
    bf16 = bf16_weights(model, autocast=autocast)
    graphed = implementation.endswith("cuda_graph")
    optimizer = make_optimizer(model, lr=1e-4, weight_decay=0.02, cuda_graph=graphed, bf16_weights=bf16)
    images = torch.randn(batch, 3, config.vision.image_size, config.vision.image_size, device=device)
    input_ids = torch.randint(5, config.text.vocab_size, (batch, TEXT_LENGTH), device=device)
    input_ids[:, 0] = 2  # [CLS]
    lengths = torch.randint(TEXT_LENGTH // 3, TEXT_LENGTH + 1, (batch, 1), device=device)
    attention_mask = (torch.arange(TEXT_LENGTH, device=device) < lengths).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    batch_tensors = (images, input_ids, attention_mask)
    step_function = compile_forward_backward() if "compiled" in implementation else forward_backward

    def step(*tensors):
        # forward_backward takes CUDA's autocast itself; on the CPU the CUDA configuration
        # (--cuda-config, step_cost.py) runs under the CPU's
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and device == "cpu"):
            return train_step(model, model, optimizer, tensors, OptimConfig.grad_clip, forward_backward=step_function)

    if "compiled" in implementation and not graphed:
        step(*batch_tensors)  # compiles
    if graphed:  # the eager warm-up calls and the recording happen here, before any timing
        step = CudaGraphStep(step)
        for _ in range(step.warmup + 1):
            step(*batch_tensors)
    run = lambda: step(*batch_tensors)  # noqa: E731
    run.forward_backward_args = (model, model, batch_tensors, OptimConfig.grad_clip)
    return run, batch
