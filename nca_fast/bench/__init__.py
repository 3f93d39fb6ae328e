"""``nca-fast bench``: honest, reproducible, comparable numbers for every NCA backend.

    from nca_fast import bench
    report = bench.run(bench.make_cases(["growing"], [64, 256]), {"growing": bench.default_model("growing")},
                       ["reference", "cpu"], torch.device("cpu"), bench.Settings())
    print(bench.report.table(report))
"""
from . import report
from .cases import Case, default_model, make_cases, realistic_state
from .providers import DEFAULT_CPU_PROVIDERS, DEFAULT_GPU_PROVIDERS, PROVIDER_NAMES, Provider, all_providers, verify
from .runner import Runner
from .suite import Settings, run

__all__ = ["Case", "default_model", "make_cases", "realistic_state", "PROVIDER_NAMES", "DEFAULT_CPU_PROVIDERS",
           "DEFAULT_GPU_PROVIDERS", "Provider", "Runner", "all_providers", "verify", "Settings", "run", "report"]
