from setuptools import setup

setup(
    name="eplb-example-policy",
    version="0.1.0",
    description="Example out-of-tree EPLB policy for vllm-eplb-plugin",
    packages=["eplb_example_policy"],
    install_requires=["vllm-eplb-plugin", "numpy"],
    entry_points={"vllm_eplb_plugin.policies": ["example-lpt = eplb_example_policy:LptPolicy"]},
)
