"""Where the time goes on the GPU: tf32 search stages, the layer step, eager host cost."""
import cProfile, io, json, os, pstats, time
import torch
from triton.testing import do_bench

OUT = os.environ.get("OUT", "/tmp")
res = {}
def log(key, value):
    res[key] = value
    print(key, value, flush=True)
    with open(f"{OUT}/probe.json", "w") as f:
        json.dump(res, f, indent=1)

import vqfast
from vqfast.kernels import nearest
t0 = time.time()
torch.manual_seed(0)
# 1. tf32 search stages at goal 2's shape
N = K = 65536; D = 256
z = torch.randn(N, D, device="cuda"); c = torch.randn(K, D, device="cuda")
nearest.nearest_code(z, c, precision="high"); torch.cuda.synchronize()
log("tf32 full ms", do_bench(lambda: nearest.nearest_code(z, c, precision="high")))
def pass1():
    r = nearest._Recheck(z, c, 1.0)
    return nearest._search(z, c, r.c_sqnorm, "tf32", None, r)
log("tf32 pass1 (norms + search + settle) ms", do_bench(pass1))
r = nearest._Recheck(z, c, 1.0); idx, dist = nearest._search(z, c, r.c_sqnorm, "tf32", None, r)
log("listed rows", int(r.count.item()))
exact = nearest.nearest_code(z, c, precision="highest")[0]
listed = r.rows[: int(r.count.item())].long()
for prec, splits in (("ieee", 16), ("ieee", 64), ("tf32x3", 16), ("tf32x3", 64)):
    nearest._RESEARCH_PRECISION, nearest._MAX_RESEARCH_SPLITS = prec, splits
    try:
        r.packed.fill_(2**63 - 1)
        i2, d2 = idx.clone(), dist.clone()
        nearest._research_listed_rows(z, c, r, i2, d2)
        wrong = int((i2[listed] != exact[listed]).sum())
        t = do_bench(lambda: nearest._research_listed_rows(z, c, r, i2, d2))
        log(f"research {prec} splits {splits}", {"ms": t, "listed rows differing from highest": wrong})
    except Exception as exc:
        log(f"research {prec} splits {splits}", repr(exc)[:400])
nearest._RESEARCH_PRECISION, nearest._MAX_RESEARCH_SPLITS = "ieee", 16
log("bf16 search ms", do_bench(lambda: nearest.nearest_code(z.bfloat16(), c.bfloat16())))
del z, c, exact
log("t after search stages s", time.time() - t0)

# 2. the layer step of the benchmark, profiled
from vqfast import VectorQuantizer
for (b, ch, h, w, k) in ((128, 256, 16, 16, 65536), (64, 128, 4, 4, 4096)):
    torch.manual_seed(0)
    x = torch.randn(b, ch, h, w, device="cuda", requires_grad=True)
    g = torch.randn(b, ch, h, w, device="cuda"); one = torch.ones((), device="cuda")
    layer = VectorQuantizer(k, ch).cuda()
    def step():
        zq, loss, _ = layer(x)
        torch.autograd.backward([zq, loss], [g, one])
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    log(f"layer {b}x{ch}x{h}x{w} K={k} ms", do_bench(step, grad_to_none=[x, *layer.parameters()]))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    with open(f"{OUT}/layer_profile_{k}.txt", "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    log(f"layer {k} profiled", True)
    del layer, x, g
log("t after layer s", time.time() - t0)

# 3. eager cost of a small search
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    zs = torch.randn(1024, 128, device="cuda").to(dtype); cs = torch.randn(4096, 128, device="cuda").to(dtype)
    for _ in range(20):
        vqfast.nearest_code(zs, cs)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(300):
        vqfast.nearest_code(zs, cs)
    host = (time.perf_counter() - t) / 300 * 1e6
    torch.cuda.synchronize()
    total = (time.perf_counter() - t) / 300 * 1e6
    log(f"small {dtype} eager us per call (host, with drain)", [round(host, 1), round(total, 1)])
    if dtype == torch.bfloat16:
        pr = cProfile.Profile(); pr.enable()
        for _ in range(300):
            vqfast.nearest_code(zs, cs)
        pr.disable(); torch.cuda.synchronize()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        with open(f"{OUT}/small_profile.txt", "w") as f:
            f.write(s.getvalue())
log("t total s", time.time() - t0)
