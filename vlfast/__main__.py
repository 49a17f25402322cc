"""python -m vlfast: versions and which backend each op runs on this machine."""
import torch

import vlfast
from vlfast.ops import available

print(f"vlfast {vlfast.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
for op, backends in available().items():
    print(f"  {op}: " + ", ".join(f"{device} {backend}" for device, backend in backends.items()))
