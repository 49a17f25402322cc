"""vlfast's trainer: pretraining a MAMO-style model with the fused ops, and retrieval with it.
train.py and retrieve.py are command lines over this package.

The modules, each using only those above it:

    config      the run's settings (dataclasses) from YAML and key=value overrides
    outputs     checkpoints, the metrics log, the loss plot, the stop on a non-finite loss
    builders    tokenizer, data sets and batch order, model (pretrained weights), processes
    optimizer   AdamW, bf16 weights with fp32 masters, clipping, the learning-rate schedule
    step        forward + backward + clipping (compiled as one graph), the step, CUDA graphs
    loop        train(): the loop with its evaluation hook
    evaluation  retrieval evaluation of a checkpoint, and retrieval fine-tuning over the loop
"""
from vlfast.trainer.builders import (BatchOrder, build_training, caption_tokenizer, image_transform, make_dataset,
                                     make_model, make_tokenizer, setup_distributed)
from vlfast.trainer.config import (DataConfig, InitConfig, OptimConfig, RetrievalConfig, TrainConfig, check_optim,
                                   default_model, load_config)
from vlfast.trainer.evaluation import (checkpoint_config, finetune, finetune_config, format_table, load_trained,
                                       run_evaluation, write_outputs)
from vlfast.trainer.loop import train
from vlfast.trainer.optimizer import MasterWeightAdamW, bf16_weights, clip_grad_norm, learning_rate, make_optimizer
from vlfast.trainer.outputs import MetricsLog, check_finite, load_checkpoint, plot_losses, save_checkpoint
from vlfast.trainer.step import (CudaGraphStep, check_whole_step_options, compile_forward_backward, forward_backward,
                                 train_step)

__all__ = ["BatchOrder", "CudaGraphStep", "DataConfig", "InitConfig", "MasterWeightAdamW", "MetricsLog",
           "OptimConfig", "RetrievalConfig", "TrainConfig", "bf16_weights", "build_training", "caption_tokenizer",
           "check_finite", "check_optim", "check_whole_step_options", "checkpoint_config", "clip_grad_norm",
           "compile_forward_backward", "default_model", "finetune", "finetune_config", "format_table",
           "forward_backward", "image_transform", "learning_rate", "load_checkpoint", "load_config", "load_trained",
           "make_dataset", "make_model", "make_optimizer", "make_tokenizer", "plot_losses", "run_evaluation",
           "save_checkpoint", "setup_distributed", "train", "train_step", "write_outputs"]
