"""A real ``vllm serve`` with the plugin on, on a tiny random MoE model (CPU-friendly).

Used by ``vllm-eplb demo`` (the README's main command) and by the engine tests:

- :func:`build_tiny_moe` writes a random-weight Qwen3-MoE checkpoint (local files only);
- :class:`VllmServer` starts the real ``vllm`` command and waits until it serves;
- :func:`complete` / :func:`metrics` talk to it over HTTP (OpenAI API, ``/metrics``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def build_tiny_moe(
    path: str | os.PathLike, *, layers: int = 2, experts: int = 8, top_k: int = 2, seed: int = 0
) -> Path:
    """Write a random Qwen3-MoE (``layers`` x ``experts``, top-``top_k``) to ``path``.

    head_dim 32: vLLM's CPU attention needs >= 32. No tokenizer: serve it with
    ``--skip-tokenizer-init`` and send token ids.
    """
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    config = Qwen3MoeConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1, norm_topk_prob=True,
        max_position_embeddings=1024, tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-moe.", dir=path.parent))
    model.save_pretrained(tmp)
    tmp.rename(path)  # all or nothing: a half-written checkpoint is never reused
    return path


class VllmServer:
    """``vllm serve MODEL ...`` as a subprocess; a context manager that waits for health.

    ``log`` receives stdout and stderr. :attr:`returncode` is set once it has exited.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        port: int,
        log: str | os.PathLike,
        additional_config: dict | None = None,
        tp: int = 2,
        eager: bool = True,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        vllm = shutil.which("vllm", path=os.path.dirname(sys.executable)) or "vllm"
        self.cmd = [
            vllm, "serve", str(model), "--port", str(port), "-tp", str(tp),
            "--skip-tokenizer-init", "--gpu-memory-utilization", "0.3",
            # Prefix caching would skip cached prompt tokens: heat counts what is computed.
            "--max-model-len", "1024", "--no-enable-prefix-caching", *extra_args,
        ]
        if eager:  # torch.compile on CPU adds ~20 s to start-up
            self.cmd.append("--enforce-eager")
        if additional_config is not None:
            self.cmd += ["--additional-config", json.dumps(additional_config)]
        self.url = f"http://127.0.0.1:{port}"
        self.model = str(model)
        self.log_path = Path(log)
        # CPU ranks need their own core each; omitted, every rank binds all cores and crawls.
        binds = "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp))
        self.env = {"VLLM_CPU_OMP_THREADS_BIND": binds, **os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 600.0) -> "VllmServer":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with {self.proc.returncode}; log: {self.log_path}\n{self.log_tail()}"
                )
            if self.healthy():
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {timeout_s:.0f} s; log: {self.log_path}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def __enter__(self) -> "VllmServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _post(url: str, body: dict, timeout: float = 300.0) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def complete(server: VllmServer, prompt: list[int], max_tokens: int) -> dict:
    """Greedy completion of token ids; returns ``{"tokens", "prompt_tokens", "completion_tokens"}``."""
    out = _post(server.url + "/v1/completions", {
        "model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True,
    })
    return {
        "tokens": out["choices"][0]["token_ids"],
        "prompt_tokens": out["usage"]["prompt_tokens"],
        "completion_tokens": out["usage"]["completion_tokens"],
    }


def metrics(server: VllmServer, prefix: str = "vllm:eplb_") -> dict[str, float]:
    """``/metrics`` samples whose name starts with ``prefix``: ``{'name{labels}': value}``."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def skewed_prompts(n: int, *, seed: int = 0, vocab: int = 512, hot: int = 6, length: int = 24) -> list[list[int]]:
    """``n`` prompts whose tokens mostly come from ``hot`` token ids (Zipf over them), so
    routing concentrates on the experts those tokens prefer."""
    rng = np.random.default_rng(seed)
    hot_ids = rng.choice(vocab, hot, replace=False)
    prompts = []
    for _ in range(n):
        ranks = np.minimum(rng.zipf(1.6, size=length), hot) - 1
        tokens = np.where(rng.random(length) < 0.9, hot_ids[ranks], rng.integers(0, vocab, length))
        prompts.append([int(t) for t in tokens])
    return prompts


def run_demo(workdir: str | os.PathLike, *, port: int = 8765, requests: int = 32, tp: int = 2) -> int:
    """Serve a tiny MoE with the plugin on, send skewed traffic, show what EPLB did."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    from ..cli import main as cli_main

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_tiny_moe(workdir / "tiny-qwen3-moe")
    print(f"[demo] model: random Qwen3-MoE, 2 layers x 8 experts, top-2, at {model}")
    record = workdir / "expert_map_record.json"
    record.unlink(missing_ok=True)
    prom = workdir / "prometheus"
    shutil.rmtree(prom, ignore_errors=True)
    prom.mkdir()
    config = {"eplb": {
        "num_redundant_experts": 2, "expert_heat_collection_interval": 32, "algorithm_execution_interval": 16,
        "expert_map_record_path": str(record),
    }}
    server = VllmServer(model, port=port, log=workdir / "vllm_serve.log", additional_config=config, tp=tp,
                        env={"PROMETHEUS_MULTIPROC_DIR": str(prom)})
    print(f"[demo] starting: {' '.join(server.cmd[:3])} ... -tp {tp} --additional-config '{json.dumps(config)}'")
    print(f"[demo] (server log: {server.log_path})")
    started = time.monotonic()
    with server:
        print(f"[demo] vllm serve is up after {time.monotonic() - started:.0f} s; sending {requests} skewed requests")
        prompts = skewed_prompts(requests)
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda p: complete(server, p, 24), prompts))
        tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in results)
        time.sleep(2.0)  # the metrics exporter publishes once a second
        got = metrics(server)
        log = server.log_text()
    print(f"[demo] served {len(results)} requests, {tokens} tokens")
    routed = {k: v for k, v in got.items() if k.startswith("vllm:eplb_routed_tokens_total")}
    print("[demo] /metrics:",
          ", ".join(f"{k.split('{')[1].rstrip('}')}: {v:.0f} assignments" for k, v in routed.items()))
    for line in re.findall(r"EPLB(?: plan|: collecting).*", log):
        print(f"[demo] server log: {line}")
    if not record.exists():
        print("[demo] no plan was recorded; see the server log", file=sys.stderr)
        return 1
    print(f"[demo] expert map written by the plugin: {record}")
    return cli_main(["inspect", str(record)])
