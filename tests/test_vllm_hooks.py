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
        "assert first.__wrapped__.__name__ == 'create_engine_config' "
        "and not hasattr(first.__wrapped__, '__wrapped__')\n"
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


def test_v2_runner_load_installs_our_policy_where_its_eplb_state_looks():
    # vLLM's v2 runner (vLLM Ascend's "MRv2" subclasses it) builds EplbState in load_model.
    proc = _run(
        "import vllm.v1.worker.worker_base, vllm_eplb_plugin as p\n"
        "from types import SimpleNamespace as NS\n"
        "p.register(); p.register()\n"
        "from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2\n"
        "from vllm.distributed.eplb import eplb_state\n"
        "assert V2.load_model._vllm_eplb_plugin_patched\n"
        "runner = NS(vllm_config=NS(additional_config={'eplb': {'policy': 'optimal'}}),\n"
        "            parallel_config=NS(enable_eplb=True, eplb_config=NS(policy='default')))\n"
        "try:\n"
        "    V2.load_model(runner)  # our hook runs first; vLLM's own load then fails on the stand-in runner\n"
        "except AttributeError:\n"
        "    pass\n"
        "cls = eplb_state.EPLB_POLICIES['default']\n"
        "assert cls.__name__ == 'PluginOptimalPolicy', cls\n"
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
        ({"eplb": {"num_redundant_experts": 1}},
         "eplb.num_redundant_experts=1: 8 experts + 1 redundant slots do not divide over 2 EP ranks"),
        ({"enable_eplb": True, "theirs": 4, "eplb": {"num_redundant_experts": 2}},
         "differs from vLLM's --eplb-config num_redundant_experts=4"),
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


def _ascend_engine(dynamic=True, v2=False, enable_eplb=False):
    engine = _engine(enable_eplb=enable_eplb, eplb={"policy": "optimal"})
    engine.additional_config["eplb_config"] = {"dynamic_eplb": dynamic}
    engine.use_v2_model_runner = v2
    return engine


@pytest.mark.parametrize(
    "ascend, kwargs, path",
    [
        (False, {}, "the plugin's planning loop runs it in a child process"),
        (False, {"enable_eplb": True}, "vLLM's EplbState calls it through EPLB_POLICIES"),
        (True, {}, "vLLM Ascend's dynamic EPLB (EplbWorker) calls it in its EPLB process"),
        (True, {"v2": True, "enable_eplb": True, "dynamic": False}, "vLLM's EplbState (vLLM Ascend's model runner v2)"),
    ],
)
def test_plan_path_names_who_runs_the_policy(ascend, kwargs, path):
    from vllm_eplb_plugin.engine.vllm_worker import plan_path

    assert plan_path(_ascend_engine(**kwargs), ascend).startswith(path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dynamic": False},
         'vLLM Ascend\'s dynamic EPLB, which is off; set additional_config.eplb_config = {"dynamic_eplb": true}'),
        ({"v2": True},
         "model runner v2 (VLLM_USE_V2_MODEL_RUNNER=1) runs EPLB only through vLLM's EplbState; pass --enable-eplb"),
    ],
)
def test_on_ascend_a_config_where_nothing_would_run_the_policy_is_refused(kwargs, message):
    from vllm_eplb_plugin.config import EplbConfigError
    from vllm_eplb_plugin.engine.vllm_worker import plan_path

    with pytest.raises(EplbConfigError, match=re.escape(message)):
        plan_path(_ascend_engine(**kwargs), True)


def test_every_vllm_patch_target_exists_and_drift_is_named():
    from vllm_eplb_plugin.engine.patching import EngineMismatch, PatchTarget, check_targets
    from vllm_eplb_plugin.engine.vllm_hooks import check_vllm_targets

    check_vllm_targets()  # the installed vLLM has every target
    gone = PatchTarget("vllm.engine.arg_utils", "EngineArgs.create_engine_config_v9", ("self",))
    moved = PatchTarget("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._model_forward", ("self", "positions"))
    with pytest.raises(EngineMismatch) as err:
        check_targets((gone, moved), "vLLM", "vLLM 0.32.x")
    text = str(err.value)
    assert "vllm.engine.arg_utils.EngineArgs.create_engine_config_v9 does not exist" in text
    assert ("GPUModelRunner._model_forward(self, positions, ...): its parameters are now (self, input_ids, positions"
            in text)
    assert text.endswith("The plugin supports vLLM 0.32.x; install one of those or remove the eplb section.")
