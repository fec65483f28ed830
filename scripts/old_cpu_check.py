"""Run under an emulated CPU without AVX (scripts/test_old_cpu.sh): the C++ kernels must
choose the baseline level and the folded fused model must match the float64 reference."""
import torch

import shvit
from shvit_kernels import _cpp

assert _cpp.available(), "the C++ extension must load"
level, ref_capability = _cpp.isa(), torch.backends.cpu.get_cpu_capability()
print(f"ATen capability {ref_capability}, shvit_kernels level {level}, levels {_cpp.levels()}")
assert level == "baseline" and _cpp.levels() == ("baseline",), "a CPU without AVX2 must run the baseline level"
torch.manual_seed(0)
ref = shvit.create_model("shvit_s1").eval()
fused = shvit.create_model("shvit_s1", fused=True).eval()
fused.load_state_dict(ref.state_dict())
fused.fuse()
x = torch.randn(2, 3, 64, 80)
with torch.no_grad():
    got, want = fused(x), ref.double()(x.double())
err = ((got.double() - want).norm() / want.norm()).item()
print(f"folded fused S1 vs float64 reference: relative error {err:.2e}")
assert err < 1e-4
