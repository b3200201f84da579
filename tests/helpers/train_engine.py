"""Run under torchrun: `cascade train stage1` with the engine named by argv[1] on CPU processes.

fsdp: accelerate 1.15 enables FSDP only for GPU-like process groups (its state ignores the plugin
on a CPU/gloo group and silently falls back to DDP), so this helper sets the FSDP state the way
accelerate would on GPUs after the Accelerator is built; torch's FSDP2 itself runs on CPU/gloo.
deepspeed2/deepspeed3: DeepSpeed's CPU accelerator runs ZeRO on gloo; nothing is patched.
The environment matches what `accelerate launch --config_file configs/accelerate/<engine>.yaml` sets."""
import os
import sys

ENV = {
    "fsdp": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
             "FSDP_TRANSFORMER_CLS_TO_WRAP": "ResnetBlock2D,Attention", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
             "FSDP_RESHARD_AFTER_FORWARD": "true"},
    "deepspeed2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    "deepspeed3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                   "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false"},  # cascade must turn it on
}


def force_fsdp_on_cpu():
    import accelerate
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    original = accelerate.Accelerator.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":  # compat_cells.py: other engines too
            return
        state = AcceleratorState()
        state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* environment
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    accelerate.Accelerator.__init__ = init


def report_grad_norms(path_prefix: str):
    """Append the norm the trainer's clipping call returns to PREFIX.<rank>, for the test to compare."""
    from stages import engines

    clip = engines.clip_gradients

    def clip_and_report(accelerator, unet, max_norm):
        norm = clip(accelerator, unet, max_norm)
        value = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor
        with open(f"{path_prefix}.{accelerator.process_index}", "a") as f:
            f.write(f"{float(value):.8e}\n")
        return norm

    engines.clip_gradients = clip_and_report


if __name__ == "__main__":
    engine = sys.argv[1]
    os.environ.update(ENV[engine])
    if engine == "fsdp":
        force_fsdp_on_cpu()
    if os.environ.get("GRAD_NORM_LOG"):
        report_grad_norms(os.environ["GRAD_NORM_LOG"])
    from cascade.cli.main import main

    sys.exit(main(["train", "stage1", *sys.argv[2:]]))
