"""Built-in policies, one module each. They are registered like any third-party policy,
through the ``vllm_eplb_plugin.policies`` entry-point group (see ``setup.py``)."""
