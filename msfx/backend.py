"""MindSpore's CPU backend as msfx uses it: synchronous kernel launch, its C++ log kept quiet, and
what its kernels lack, probed in one place (the maths falls back around it). Imported by the
model code before any kernel runs."""
from __future__ import annotations

import ctypes
import os

import mindspore as ms
from mindspore import Tensor


def raise_cpp_log_threshold(level: int = 3) -> None:
    """Keep MindSpore's C++ messages below `level` (3: errors) out, after mindspore was imported.

    MindSpore 2.10 has no API for it and reads GLOG_v once; its log macros compare against the
    exported per-submodule table `mindspore::g_ms_submodule_log_levels` (39 ints, `nm -DS
    libmindspore_core.so`), which is raised here. Another MindSpore keeps its log as it is.
    """
    if not ms.__version__.startswith("2.10."):
        return
    core = ctypes.CDLL(os.path.join(os.path.dirname(ms.__file__), "lib", "libmindspore_core.so"))
    levels = (ctypes.c_int * 39).in_dll(core, "_ZN9mindspore25g_ms_submodule_log_levelsE")
    for i, current in enumerate(levels):
        levels[i] = max(current, level)


def lacks_bf16_kernels(x: Tensor) -> bool:
    """True for a bfloat16 `x` on MindSpore's CPU backend, whose kernels (2.10) have no bfloat16
    MatMul, BatchMatMul, Gather, SiLU or TensorScatterElements. There those ops compute in
    float32 and round the result to bfloat16, as PyTorch's CPU bfloat16 kernels do. (Eager only:
    the CPU graph compiler lacks even a bfloat16 Reshape, so `jit` steps cannot run bf16 there.)"""
    return x.dtype == ms.bfloat16 and ms.get_context("device_target") == "CPU"


_actors_lowered = False


def lower_actor_threads() -> None:
    """Give MindSpore's actor threads (`ActorThread_*`) the lowest scheduling priority (nice 19), once their
    runtime has started. After an eager op they busy-yield (mindrt's spin count) and, being always runnable,
    took one of the 2 cores from the product kernels' threads for the next ~100 ms: a T5-XXL-shaped bfloat16
    layer's products ran at half speed (measured; compiled decode steps unaffected either way). Linux only;
    a no-op elsewhere or if the threads cannot be reniced."""
    global _actors_lowered
    if _actors_lowered or not hasattr(os, "setpriority") or not os.path.isdir("/proc/self/task"):
        return
    actors = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("ActorThread"):
                    actors.append(int(tid))
        except OSError:
            continue  # the thread ended
    for tid in actors:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        except OSError:
            pass
    _actors_lowered = bool(actors)  # none yet: MindSpore starts them with its first op


if ms.get_context("device_target") == "CPU":
    # Synchronous kernel launch: eager CPU steps ran ~10x faster (2.6 s -> 0.2 s per SmolLM2
    # token, measured with MindSpore 2.10); compiled steps are unaffected.
    ms.runtime.launch_blocking()
