"""Starting or joining Ray, the one way every entry point does it."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None, log_to_driver: bool = False) -> None:
    """Join ``RAY_ADDRESS`` when set, else start a local cluster (``num_cpus`` caps it); a no-op
    when Ray is up. Worker logs stay in Ray's session log directory unless ``log_to_driver``:
    the console gets tfa-ray's own progress lines, not every worker's output."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)


def assigned_cpus() -> int | None:
    """CPUs Ray gave the current task / actor / Train worker, rounded (1.5: 2), at least 1; None
    outside a Ray worker. How many torch threads it should run."""
    import ray

    ctx = ray.get_runtime_context() if ray.is_initialized() else None
    if ctx is None or ctx.worker.mode != ray.WORKER_MODE:  # the driver, or no Ray at all
        return None
    cpus = ctx.get_assigned_resources().get("CPU", 0.0)
    return max(1, int(cpus + 0.5))


def session_log_dir() -> str | None:
    """Where this Ray session writes its worker logs (None when Ray is not up)."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except AttributeError:  # a client connection: the logs are on the head node
        return None
