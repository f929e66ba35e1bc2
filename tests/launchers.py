"""The two launchers a distributed stage must run under, as argv prefixes for 2 CPU ranks (gloo) on `port`:
torchrun, and `accelerate launch` (a peft dependency), which starts the same torchrun-style ranks."""
import sys

LAUNCHERS = {
    "torchrun": lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              f"--master_port={port}"],
    "accelerate": lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2",
                                "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
                                f"--main_process_port={port}"],
}
