"""vLLM Ascend's source tree, unpacked from the sdist that ``.ci/setup`` downloads.

Only ``vllm_ascend/`` and ``tests/`` are unpacked: the sdist's ``*.egg-info`` would
register vLLM Ascend's platform plugin with vLLM on this CPU machine.
"""

from __future__ import annotations

import os
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
STANDIN = os.path.join(os.path.dirname(HERE), "ascend", "standin")


def unpack(sdist: str) -> str:
    """Unpack once next to the tarball; returns the directory to put on ``sys.path``."""
    root = sdist[: -len(".tar.gz")] + "-src"
    done = os.path.join(root, ".unpacked")
    if os.path.exists(done):
        return root
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/")[1:2] in (["vllm_ascend"], ["tests"])]
        for m in members:
            m.name = m.name.split("/", 1)[1]
        tar.extractall(root, members=members, filter="data")
    open(done, "w").close()
    return root


def pythonpath(sdist: str) -> str:
    """PYTHONPATH for a process that runs vLLM Ascend's code here (stand-ins first)."""
    parts = [STANDIN, unpack(sdist), HERE, os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)
