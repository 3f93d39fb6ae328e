"""Run by test_kernels_compile.py in a process without TRITON_INTERPRET (the kernels must be Triton's
JIT functions): every kernel launch the public paths make — ``model.step`` with and without an explicit
mask, rollouts, frames, the backward of a step and of a rollout, the decoders — on the published
architectures in every precision, at two grid sizes and many step offsets, intercepted where Triton
would compile it (Triton's own binder computes what it would compile; nothing runs, no GPU needed).
Exits non-zero, listing them, when

* a published model's launch is not a configuration of ``nca-fast kernels``' catalogue (the same
  kernel, warps, stages, constexprs and argument types: the binary the report describes is the one
  that runs), or
* one configuration would compile more than once (an integer argument specialised on its value).

Exit code 77: this Triton's internals differ (the test skips)."""
import inspect
import json
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
import torch

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
except ImportError as e:
    print(f"triton internals moved: {e}")
    sys.exit(77)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nca_fast as nf
from nca_fast.decoders import build_decoder, decode, lppn_spec, pixel_shuffle_spec
from nca_fast.kernels import catalogue
from nca_fast.kernels import config as kconfig

kconfig.device_problem = lambda x: ""  # (CPU tensors count as launchable: nothing is launched)
backend = make_backend(GPUTarget("cuda", 90, 32))
binders, launches = {}, []


def intercept(self, *args, grid, warmup, **kwargs):
    """What JITFunction.run would compile (its binder and _pack_args), recorded instead of compiled."""
    if self not in binders:
        binders[self] = create_function_from_signature(self.signature, self.params, backend)
    bound, specialization, options = binders[self](*args, **kwargs)
    options, signature, constexprs, _ = self._pack_args(backend, kwargs, bound, specialization, options)
    launches.append((self.fn.__name__, {self.arg_names[k[0]]: v for k, v in constexprs.items()},
                     {n: t for n, t in signature.items() if t != "constexpr"}, options.num_warps,
                     options.num_stages, options.maxnreg, launch_of))


JITFunction.run = intercept
launch_of = ""
for name, spec in catalogue.PUBLISHED.items():
    for dtype, mm in ((torch.float32, "tf32"), (torch.float32, "ieee"), (torch.float16, "tf32"),
                      (torch.bfloat16, "tf32")):
        m = nf.NCA(spec, init_seed=0)
        m.check_finite, m.fp32_matmul = False, mm
        for H, W in ((12, 300), (7, 71)):
            x = torch.zeros(2, spec.channels, H, W, dtype=dtype)
            launch_of = f"{name} {dtype} {mm} {H}x{W}"
            with torch.no_grad():
                m.step(x, seed=0, step=1, backend="triton")
                m.step(x, update_mask=torch.ones(2, 1, H, W, dtype=torch.bool), backend="triton")
                m.rollout(x, 18, seed=0, start_step=5, backend="triton")  # (step offsets 0 .. 17)
                m.rollout(x, 3, seed=0, every=1, backend="triton")
            if dtype == torch.float32:
                xx = x.clone().requires_grad_(True)
                m.step(xx, seed=0, backend="triton").sum().backward()
                m.rollout(xx, 17, seed=0, every=2, backend="triton").sum().backward()
published = len(launches)
texture = nf.NCA(nf.texture_spec(), init_seed=0)
texture.check_finite = False
for dtype in (torch.float32, torch.float16):
    launch_of = f"decoders {dtype}"
    x = torch.zeros(1, 12, 12, 300, dtype=dtype)
    for dspec in (pixel_shuffle_spec(12, scale=8, out_channels=3), pixel_shuffle_spec(12, scale=4, hidden=32)):
        with torch.no_grad():
            texture.fused_rollout(x.shape, dtype, steps=2, decoder=build_decoder(dspec))(x, seed=0)
            decode(build_decoder(dspec), x.float(), backend="triton")
    decode(build_decoder(lppn_spec(12, scale=8, out_channels=3, hidden=32, layers=3)), x.float(), backend="triton",
           precision="fp16")


def key(d) -> str:
    return json.dumps(d, sort_keys=True, default=str)


def with_defaults(c) -> dict:
    """A configuration's constexprs with the kernel's defaults for those it leaves out (as a launch)."""
    ce = dict(c.constexprs)
    for n, p in inspect.signature(c.fn.fn).parameters.items():
        if n not in c.signature and n not in ce and p.default is not inspect.Parameter.empty:
            ce[n] = p.default
    return ce


configs = [(c, with_defaults(c)) for c in catalogue.compile_configs()]
problems = []
inputs = {}  # (kernel, constexprs) -> the set of compile inputs seen for it
for i, (fn, ce, sig, warps, stages, maxnreg, where) in enumerate(launches):
    inputs.setdefault((fn, key(ce)), set()).add((key(sig), warps, stages, maxnreg))
    if i >= published:
        continue  # (decoders at any scale: the catalogue holds representative heads)
    same = [c for c, cce in configs if c.fn.fn.__name__ == fn and c.num_warps == warps and c.num_stages == stages
            and c.maxnreg == maxnreg and all(key(cce.get(k)) == key(v) for k, v in ce.items())]
    if not any(all(c.signature.get(k) == t for k, t in sig.items()) for c in same):
        nearest = same[0] if same else None
        diff = ({k: (t, nearest.signature.get(k)) for k, t in sig.items() if nearest.signature.get(k) != t}
                if nearest else {k: ce[k] for k in ("INTERIOR", "PENDING", "HAS_MASK", "PREC", "DOT_T") if k in ce})
        problems.append(f"{where}: {fn} not in the catalogue "
                        f"({'nearest ' + nearest.name + ', types (launch, catalogue) ' if nearest else 'constexprs '}"
                        f"{diff})")
for (fn, _ce), seen in inputs.items():
    if len(seen) > 1:
        problems.append(f"{fn} compiles {len(seen)} times for one configuration: {sorted(seen)[:2]}")
problems = sorted(set(problems))
print(f"{len(launches)} launches, {len(inputs)} configurations, {len(problems)} problems")
for p in problems:
    print(p)
sys.exit(1 if problems else 0)
