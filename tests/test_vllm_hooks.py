"""register(): idempotent, installs only what a process needs, inert without eplb."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import import_peer

import_peer("vllm")

MAP_8E = str(Path(__file__).parent.parent / "configs" / "expert_map_8e_2r.json")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_register_twice_patches_once_and_only_what_the_process_loaded():
    proc = _run(
        "import vllm.engine.arg_utils as a, vllm_eplb_plugin as p, sys\n"
        "p.register(); first = a.EngineArgs.create_engine_config\n"
        "p.register(); assert a.EngineArgs.create_engine_config is first\n"
        "assert first.__wrapped__.__name__ == 'create_engine_config' and not hasattr(first.__wrapped__, '__wrapped__')\n"
        "assert 'vllm.v1.worker.gpu_model_runner' not in sys.modules, 'worker hooks in a non-worker process'\n"
        "print('ok')"
    )
    assert proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_worker_process_gets_runner_and_router_hooks_once():
    proc = _run(
        "import vllm.engine.arg_utils, vllm.v1.worker.worker_base, vllm_eplb_plugin as p\n"
        "p.register(); p.register()\n"
        "from vllm.v1.worker.gpu_model_runner import GPUModelRunner as G\n"
        "from vllm.v1.worker.cpu_model_runner import CPUModelRunner as C\n"
        "from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter as B\n"
        "for f in (G._model_forward, G.load_model, C.load_model, B.set_capture_fn):\n"
        "    assert f._vllm_eplb_plugin_patched and not getattr(f.__wrapped__, '_vllm_eplb_plugin_patched', False)\n"
        "print('ok')"
    )
    assert proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_capture_chain_keeps_both_functions_in_either_order():
    from vllm_eplb_plugin.engine.vllm_worker import _OURS, chain_capture

    class Router:
        pass

    seen = []

    def theirs_only(ids):
        seen.append(ids)

    router = Router()
    assert chain_capture(router, theirs_only) is theirs_only  # no collector yet: untouched
    setattr(router, _OURS, lambda ids: seen.append(("ours", ids)))
    chained = chain_capture(router, lambda ids: seen.append(("theirs", ids)))
    chained(7)
    assert seen == [("theirs", 7), ("ours", 7)]
    assert chain_capture(router, chained) is chained  # re-setting a chain does not nest it
    assert chain_capture(router, None) is getattr(router, _OURS)  # clearing theirs keeps ours


def test_engine_config_without_eplb_is_untouched():
    from types import SimpleNamespace

    from vllm_eplb_plugin.engine.vllm_worker import check_engine_config

    assert check_engine_config(SimpleNamespace(additional_config={"ascend_other": 1})) is None
    assert check_engine_config(SimpleNamespace(additional_config=None)) is None


def _engine(tp=2, dp=1, experts=8, enable_eplb=False, theirs=0, eplb=None, hf_key="num_experts"):
    from types import SimpleNamespace

    hf = SimpleNamespace(**({hf_key: experts} if hf_key else {}))
    return SimpleNamespace(
        additional_config={"eplb": eplb or {}},
        model_config=SimpleNamespace(model="m", hf_text_config=hf, hf_config=hf),
        parallel_config=SimpleNamespace(
            tensor_parallel_size=tp, data_parallel_size=dp, enable_eplb=enable_eplb,
            eplb_config=SimpleNamespace(num_redundant_experts=theirs),
        ),
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dp": 2}, "eplb: data_parallel_size=2 is not supported"),
        ({"hf_key": None}, "does not look like a MoE model"),
        ({"eplb": {"num_redundant_experts": 1}}, "eplb.num_redundant_experts=1: 8 experts + 1 redundant slots do not divide over 2 EP ranks"),
        ({"enable_eplb": True, "theirs": 4, "eplb": {"num_redundant_experts": 2}}, "differs from vLLM's --eplb-config num_redundant_experts=4"),
        ({"experts": 16, "eplb": {"expert_map_path": MAP_8E}}, "the map places 8 experts but the model has 16"),
    ],
)
def test_engine_config_errors_name_the_key_and_the_fix(kwargs, message):
    from vllm_eplb_plugin.config import EplbConfigError
    from vllm_eplb_plugin.engine.vllm_worker import check_engine_config

    with pytest.raises(EplbConfigError, match=re.escape(message)):
        check_engine_config(_engine(**kwargs))


def test_engine_config_accepts_a_fitting_section():
    from vllm_eplb_plugin.engine.vllm_worker import check_engine_config

    assert check_engine_config(_engine(eplb={"num_redundant_experts": 2})).num_redundant_experts == 2
