"""pp2 prefill wall time on CPU by micro-batch count (a measurement, not a test): random weights of the shapes
runtime/rank_files.py says each rank holds, two gloo ranks of one thread each. python tests/perf/pp_overlap.py"""
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from runtime.model import Decoder  # noqa: E402
from runtime.parallel import Comm, RankLayout  # noqa: E402
from runtime.rank_files import expected_tensors  # noqa: E402
from runtime.spec import ModelSpec  # noqa: E402

SPEC = ModelSpec(family="llama", vocab_size=2000, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                 intermediate_size=1536, max_position_embeddings=512)
LENGTHS = [128] * 8


def main(rank, init):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    mapping = {"tp": 1, "pp": 2}
    g = torch.Generator().manual_seed(rank)
    tensors = {n: torch.randn(s, generator=g) * 0.02 for n, (s, _) in
               expected_tensors(SPEC, mapping, "none", torch.float32, rank).items()}
    dec = Decoder(SPEC, tensors, layout=RankLayout.of(SPEC, mapping, rank), comm=Comm(1, 2))
    tokens = torch.randint(0, SPEC.vocab_size, (sum(LENGTHS),), generator=torch.Generator().manual_seed(0))
    ref = None
    for m in (1, 2, 4, 8):
        dec.micro_batches = m
        with torch.inference_mode():
            dec.prefill(tokens, LENGTHS)  # warm-up
            dist.barrier()
            t = time.perf_counter()
            for _ in range(3):
                out = dec.prefill(tokens, LENGTHS)
            dt = (time.perf_counter() - t) / 3
        ref = out if ref is None else ref
        if rank == 0:
            print(f"M={m}: {dt * 1000:.0f} ms per prefill ({sum(LENGTHS)} tokens), max |logits - M=1| "
                  f"{(out - ref).abs().max().item():.1e}", flush=True)
    spans, layers = [], dec.prefill_layers  # when each micro-batch runs on each stage: overlapping spans

    def timed(h, packed):
        t0 = time.time()
        out = layers(h, packed)
        spans.append((round(t0 - base, 3), round(time.time() - base, 3)))
        return out
    dec.prefill_layers, dec.micro_batches = timed, 4
    dist.barrier()
    base = time.time()
    with torch.inference_mode():
        dec.prefill(tokens, LENGTHS)
    print(f"M=4 stage {rank} micro-batch spans (s): {spans}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    init = f"/tmp/pp_overlap_{os.getpid()}"
    mp.start_processes(main, args=(init,), nprocs=2, start_method="fork")
