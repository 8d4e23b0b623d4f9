"""Engine: load an engine directory and generate with it."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .dist import lockstep
from .errors import EngineError, UserError
from .format import TOKENIZER_DIR, rank_file, verify_engine, world_size
from .launch import detect_world
from .model import Decoder
from .params import (check_device, check_sampling, check_stop_strings, check_token_ids, is_one_prompt, short,
                     utf8_problem)
from .sampling import sample
from .spec import ModelSpec

log = logging.getLogger(__name__)



@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]  # new tokens only, up to and including a stop token
    finish_reason: str  # "stop" | "length"
    text: str | None = None  # decoded new tokens, when a tokenizer is present
    extra: dict = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    """auto | cpu | cuda | cuda:N (N below the visible GPUs) -> torch.device; anything else a UserError."""
    device = check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


STOP_CHECK = 8  # CUDA: decode steps between the host's reads of "has every row stopped?" (each read is a sync)
COMPILE_CACHE_ENV = "EF_COMPILE_CACHE"  # where compiled artifacts persist between processes


def compile_cache_dir() -> Path:
    """$EF_COMPILE_CACHE, else $XDG_CACHE_HOME/engine-factory/compile (~/.cache/...): per user, outside every
    engine (an engine's bytes and hash never depend on what was compiled for it)."""
    if os.environ.get(COMPILE_CACHE_ENV):
        return Path(os.environ[COMPILE_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "engine-factory" / "compile"


def use_compile_cache() -> Path:
    """Point Inductor's FX-graph and AOT caches and Triton's kernel cache at compile_cache_dir(), unless the
    user named their own (TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR): a second process compiling the same
    engine loads the compiled kernels instead of generating them (Dynamo still traces)."""
    root = compile_cache_dir()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    import torch._functorch.config as aot_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    aot_config.enable_autograd_cache = True  # AOTAutograd's cache serves inference graphs too
    return root


def decode_defaults(device: torch.device) -> dict:
    """Inductor options the compiled decode step takes unless told otherwise. On a GPU with programmatic
    dependent launch (sm >= 90; torch >= 2.10 has the option): Inductor's kernels are launched so that each may
    start while the one before it ends, waiting (griddepcontrol.wait) before it reads what that one wrote, and
    let the next start once they have read their inputs: the gaps between a step's ~400 small kernels shrink.
    H100, 2026-12-07, LLaMA-2-7B dummy, batch 1, 128 + 256, `runtime.bench --compile` with and without it, each
    pair in one device call: int8_wo 273.3 -> 281.2 total tok/s, bf16 180.9 -> 184.2; batch 64 unchanged (6,877 /
    6,885, two calls; docs/benchmarks.md). Our own Triton kernels and cuBLAS launch as before (after the kernel
    before them completes). TORCHINDUCTOR_ENABLE_PDL=0 / 1 in the environment (Inductor's own switch) is left
    to decide, for every command that compiles (runtime.run / summarize / bench --compile)."""
    import torch._inductor.config as inductor_config

    if device.type != "cuda" or "TORCHINDUCTOR_ENABLE_PDL" in os.environ \
            or not hasattr(inductor_config, "triton.enable_pdl") or torch.cuda.get_device_capability(device)[0] < 9:
        return {}
    return {"triton.enable_pdl": True}


def graph_bucket(batch: int, max_batch: int) -> int:
    """The CUDA-graph batch size that serves `batch` rows: the next power of two, at most max_batch."""
    return min(1 << (batch - 1).bit_length(), max_batch)


class _DecodeGraph:
    """The decode step for one batch-size bucket, captured once in a CUDA graph and replayed per token,
    greedy argmax included. A batch of B <= bucket rows fills rows 0..B-1; the padding rows write token 0
    at position 0 of slots B..bucket-1, which no row of that batch uses (a later batch's prefill writes
    a slot's positions before its decode reads them)."""

    def __init__(self, model: Decoder, batch: int, step: Callable | None = None):
        step = step or model.decode
        dev = model.device
        self.tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        # Warm-up and capture run decode for real and write K/V at `pos`: aim them at the last cache
        # position, which no sequence has reached yet (a real write there comes before any read of it).
        self.pos = torch.full((batch,), model.cache_shape[1] - 1, dtype=torch.long, device=dev)
        self.rows = batch

        def step_and_argmax(tokens, pos):
            logits = step(tokens, pos)
            return logits, logits.argmax(dim=-1)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up kernels/allocations outside the capture
            for _ in range(2):  # (a compiled step compiles here)
                step_and_argmax(self.tokens, self.pos)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, self.argmax = step_and_argmax(self.tokens, self.pos)

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of rows 0..B-1: a view of the graph's output, valid until the next call."""
        B = tokens.shape[0]
        self.tokens[:B].copy_(tokens)
        self.pos[:B].copy_(pos)
        if B < self.pos.shape[0]:  # padding rows: position 0 of slots no row of this batch uses, so
            self.pos[B:].zero_()  # that attention over them costs one position, not the whole cache
        self.rows = B
        self.graph.replay()
        return self.logits[:B]

    @property
    def greedy(self) -> torch.Tensor:
        """The argmax tokens (B,) of the last call's rows, computed inside the graph."""
        return self.argmax[:self.rows]


class Engine:
    def __init__(self, engine_dir: Path, config: dict, model: Decoder, tokenizer=None):
        self.engine_dir = engine_dir
        self.config = config
        self.spec: ModelSpec = model.spec
        self.model = model
        self.device = model.device
        self.limits = config["limits"]
        self.tokenizer = tokenizer
        self.use_cuda_graphs = self.device.type == "cuda" and config.get("runtime", {}).get("cuda_graphs", True)
        self._graphs: dict[int, _DecodeGraph] = {}
        self._step = model.decode
        self.compiled = False
        self.inductor_options: dict = {}  # (compile(): what the compiled decode step was given)
        self.ranks = None  # runtime.dist.Ranks of a multi-rank engine: this process's rank among them
        # decode steps between reads of "every row stopped?": on CUDA a read waits for the GPU, on CPU it is free
        self.stop_check = STOP_CHECK if self.device.type == "cuda" else 1

    def close(self) -> None:
        """A multi-rank engine: stop the local ranks that it started, leave the process group (also at exit)."""
        if self.ranks is not None:
            self.ranks.close()

    @lockstep
    def compile(self, inductor: dict | None = None) -> "Engine":
        """Compile the decode step with torch.compile (Inductor fuses the norms, rotary, cache writes and
        masks of each layer). The first decode of each batch-size bucket compiles (tens of seconds for a 7B
        model); on CUDA the compiled step is then captured in the bucket's CUDA graph. On a one-rank CUDA
        engine the prefill's layers are compiled too, once for every prompt shape (dynamic shapes). Compiled
        kernels are cached in compile_cache_dir() for the next process. A tensor-parallel engine on CPU ranks
        compiles on every rank alike (Dynamo traces the gloo all-reduces); on CUDA ranks and with pipeline
        stages compile is refused with one line. inductor: Inductor config for the decode step (torch.compile's
        options, e.g. {"combo_kernels": True}: independent kernels launched as one), over decode_defaults()
        (on Hopper and later, programmatic dependent launch of Inductor's kernels; {"triton.enable_pdl": False}
        turns it off); the options used are kept in self.inductor_options."""
        comm = self.model.comm
        if comm.pp > 1:  # every rank raises this alike, before any collective
            raise UserError(f"{self.engine_dir.name}: --compile / Engine.compile() is for engines without pipeline "
                            f"stages (this one has pp={comm.pp}: its stages' send/recv are not traced); "
                            "run it without compiling")
        if comm.world_size > 1 and self.device.type == "cuda":
            # ranks sharing one GPU run gloo, whose all-reduce inside a compiled CUDA step crashed (SIGSEGV,
            # torch 2.11, H200); NCCL ranks (a GPU each) are not tested yet: the multi-GPU kinds are withheld
            raise UserError(f"{self.engine_dir.name}: --compile / Engine.compile() of a {comm.world_size}-rank engine "
                            "runs on CPU ranks only for now (on CUDA its collectives inside the compiled step are not "
                            "tested); run it on CUDA without compiling")
        use_compile_cache()
        self.inductor_options = {**decode_defaults(self.device), **(inductor or {})}
        self._step = torch.compile(self.model.decode, dynamic=False, fullgraph=True,
                                   options=self.inductor_options or None)
        if self.device.type == "cuda" and self.model.comm.world_size == 1:
            self.model.compile_prefill()
        self._graphs.clear()
        self.compiled = True
        return self

    # ---- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, engine_dir: str | Path, device: str = "auto", verify: str = "full",
             tokenizer_dir: str | Path | None = None, rank: int = 0) -> "Engine":
        engine_dir = Path(engine_dir)
        if not engine_dir.is_dir():
            raise UserError(f"engine folder {engine_dir} does not exist; build one with "
                            "`python -m engine_factory model.source=...` and pass the path it prints")
        world = detect_world()  # under a launcher every rank loads: each hashes its own rank file
        _, config = verify_engine(engine_dir, verify, own_rank=world.rank if world else None)
        # (engine.json checked; only listed files are read)
        if not (isinstance(rank, int) and 0 <= rank < world_size(config)):
            raise UserError(f"rank={rank!r}: this engine has ranks 0..{world_size(config) - 1}")
        dev = resolve_device(device)
        _check_target(engine_dir, config.get("target", {}), dev)
        mapping = config["mapping"]
        if mapping["tp"] * mapping["pp"] != 1:  # this process's rank: under a launcher, or driving local ranks
            from .dist import load_engine
            return load_engine(cls, engine_dir, config, dev, verify, tokenizer_dir)
        return cls._from_rank(engine_dir, config, dev, rank, tokenizer_dir)

    @classmethod
    def _from_rank(cls, engine_dir: Path, config: dict, dev: torch.device, rank: int, tokenizer_dir,
                   layout=None, comm=None) -> "Engine":
        """The Engine of one rank file (layout/comm: its place among the ranks of a multi-rank engine)."""
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(engine_dir / rank_file(rank)), device=str(dev))
        except Exception as e:  # safetensors' own error type for truncated/corrupt files
            raise EngineError(f"{engine_dir / rank_file(rank)}: not a readable rank file ({e}); "
                              "rebuild the engine") from None
        spec = ModelSpec.from_dict(config["spec"])
        q = config["quant"]
        model = Decoder(spec, tensors, quant=q["mode"], layout=layout, comm=comm, kv_cache=q.get("kv_cache", "auto"),
                        quant_lm_head=q.get("lm_head", False))
        tok = None
        tdir = Path(tokenizer_dir) if tokenizer_dir else engine_dir / TOKENIZER_DIR
        if tokenizer_dir or tdir.is_dir():
            from .tokenizer import load_tokenizer
            tok = load_tokenizer(tdir)
        log.info("loaded %s on %s (%s)", engine_dir.name, dev, config["dtype"])
        return cls(engine_dir, config, model, tok)

    # ---- text helpers -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise UserError(f"encode takes a str, not {type(text).__name__}")
        why = utf8_problem(text)
        if why:
            raise UserError(f"text is {why}; pass UTF-8 text, or token ids")
        if self.tokenizer is None:
            raise UserError(f"engine {self.engine_dir} has no tokenizer/; pass token ids, or a "
                            "tokenizer folder (--tokenizer_dir / Engine.load(tokenizer_dir=...))")
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        bos = self.spec.bos_token_id
        if self.spec.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _as_ids(self, prompts) -> list[list[int]]:
        """A str, a list of token ids, or a list of those -> one list of ids per prompt (checked)."""
        if is_one_prompt(prompts):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise UserError(f"prompts={short(prompts)}: give a str, a list of token ids, or a non-empty list "
                            "of those")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                why = utf8_problem(p)
                if why:
                    raise UserError(f"prompt {i} is {why}; pass UTF-8 text, or token ids")
                # a tokenizer folder passed by hand may know more ids than the model
                out.append(check_token_ids(self.encode(p), self.spec.vocab_size, f"prompt {i}"))
            elif isinstance(p, (list, tuple)):
                out.append(check_token_ids(p, self.spec.vocab_size, f"prompt {i}"))
            else:
                raise UserError(f"prompt {i} ({short(p)}) is neither text nor a list of token ids")
            if not out[-1]:
                raise UserError(f"prompt {i} is empty; give at least one token")
        return out

    def _ensure_cache(self, batch: int) -> None:
        want = (self.limits["max_batch_size"], self.limits["max_seq_len"])
        if self.model.cache_shape != want:
            self.model.allocate_cache(*want)
            self._graphs.clear()

    # ---- scoring ------------------------------------------------------------------------------
    @lockstep
    @torch.inference_mode()
    def score(self, token_ids) -> torch.Tensor | list[torch.Tensor]:
        """Logits (T, V) float32 at every position, as a transformers forward would give."""
        single = is_one_prompt(token_ids)
        seqs = self._as_ids(token_ids)
        self._check_lengths(seqs, 0)
        logits = self.model.prefill(torch.tensor(sum(seqs, []), device=self.device),
                                    [len(s) for s in seqs], all_logits=True)
        parts = list(logits.split([len(s) for s in seqs]))
        return parts[0] if single else parts

    def _check_lengths(self, seqs: list[list[int]], max_new_tokens: int) -> None:
        lim = self.limits
        for i, s in enumerate(seqs):
            if len(s) > lim["max_input_len"]:
                raise UserError(f"prompt {i} has {len(s)} tokens, over this engine's max_input_len "
                                f"{lim['max_input_len']}; shorten it or rebuild with limits.max_input_len="
                                f"{len(s)}")
            if len(s) + max_new_tokens > lim["max_seq_len"]:
                raise UserError(f"prompt {i}: {len(s)} tokens + {max_new_tokens} new exceed max_seq_len "
                                f"{lim['max_seq_len']}; lower max_new_tokens (--max_output_len) to at most "
                                f"{lim['max_seq_len'] - len(s)} or rebuild with larger limits")

    # ---- generation ---------------------------------------------------------------------------
    @lockstep
    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, stop_token_ids: Sequence[int] | None = None,
                 stop: Sequence[str] | None = None, ignore_eos: bool = False, seed: int | None = 0,
                 streamer: Callable[[int, int], None] | None = None) -> list[Generation]:
        """Generate for a batch of prompts (texts or token-id lists) of any lengths.

        Stops a sequence at an EOS / stop token (unless ignore_eos) or a stop string. streamer(i, token)
        is called for each new token of prompt i as it is produced. Valid ranges: runtime/params.py.
        """
        max_new_tokens, temperature, top_k, top_p, seed = check_sampling(max_new_tokens, temperature, top_k,
                                                                         top_p, seed)
        stop = check_stop_strings(stop)
        if stop and self.tokenizer is None:
            raise UserError(f"stop={short(stop)}: stop strings need a tokenizer and this engine has none; pass "
                            "stop_token_ids, or a tokenizer folder (--tokenizer_dir)")
        if stop_token_ids is not None:
            stop_token_ids = check_token_ids(stop_token_ids, self.spec.vocab_size, "stop_token_ids")
        if not isinstance(ignore_eos, bool):
            raise UserError(f"ignore_eos={short(ignore_eos)}: must be True or False")
        if streamer is not None and not callable(streamer):
            raise UserError(f"streamer={short(streamer)}: must be a function (i, token) or None")
        seqs = self._as_ids(prompts)
        self._check_lengths(seqs, max_new_tokens)
        stops = set(stop_token_ids or ())
        if not ignore_eos:
            stops |= set(self.spec.eos_token_ids)
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed or 0)
        results: list[Generation] = []
        bmax = self.limits["max_batch_size"]
        for start in range(0, len(seqs), bmax):
            chunk = seqs[start:start + bmax]
            outs = self._generate_batch(chunk, max_new_tokens, temperature, top_k, top_p, stops, stop,
                                        gen, streamer, start)
            results.extend(outs)
        return results

    def _decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, temperature: float, top_k: int,
                     top_p: float, gen) -> torch.Tensor:
        """The next token of each row after `tokens` at `pos`: greedy inside the CUDA graph of the batch's
        bucket, other sampling on the graph's logits."""
        if not self.use_cuda_graphs:
            return sample(self._step(tokens, pos), temperature, top_k, top_p, gen)
        bucket = graph_bucket(tokens.shape[0], self.limits["max_batch_size"])
        if bucket not in self._graphs:
            self._graphs[bucket] = _DecodeGraph(self.model, bucket, self._step)
        graph = self._graphs[bucket]
        logits = graph(tokens, pos)
        return graph.greedy if temperature <= 0 else sample(logits, temperature, top_k, top_p, gen)

    def _generate_batch(self, seqs, max_new, temperature, top_k, top_p, stops, stop_strings, gen,
                        streamer, offset) -> list[Generation]:
        self._ensure_cache(len(seqs))
        dev, B = self.device, len(seqs)
        logits = self.model.prefill(torch.tensor([t for s in seqs for t in s], device=dev), [len(s) for s in seqs])
        nxt = sample(logits, temperature, top_k, top_p, gen)
        pos = torch.tensor([len(s) for s in seqs], device=dev)
        stop_t = torch.tensor(sorted(stops), device=dev, dtype=torch.long)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        out = torch.zeros(B, max_new, dtype=torch.long, device=dev)
        n = 0
        for step in range(max_new):
            out[:, step] = nxt
            n = step + 1
            finished |= torch.isin(nxt, stop_t)
            if streamer is not None:
                for i, t in enumerate(nxt.tolist()):
                    streamer(offset + i, t)
            if stop_strings and self._hit_stop_strings(out[:, :n], stop_strings):
                break
            # reading `finished` waits for the GPU: only every stop_check steps (and each step when a streamer
            # already waits), so the host queues the next steps while the GPU runs; steps past the last
            # row's stop only cost time: _finish cuts every row at its first stop
            if step + 1 == max_new or ((streamer is not None or n % self.stop_check == 0) and bool(finished.all())):
                break
            nxt = self._decode_step(nxt, pos, temperature, top_k, top_p, gen)
            pos = pos + 1
        return [self._finish(seqs[i], out[i, :n].tolist(), stops, stop_strings) for i in range(B)]

    def _hit_stop_strings(self, out: torch.Tensor, stop_strings) -> bool:
        texts = [self.decode_text(row) for row in out.tolist()]
        return all(any(s in t for s in stop_strings) for t in texts)

    def _finish(self, prompt, ids, stops, stop_strings) -> Generation:
        reason = "length"
        for j, t in enumerate(ids):
            if t in stops:
                ids, reason = ids[: j + 1], "stop"
                break
        text = None
        if self.tokenizer is not None:
            text = self.decode_text(ids)
            for s in stop_strings or ():
                if s in text:
                    text, reason = text[: text.index(s)], "stop"
        return Generation(prompt_ids=prompt, output_ids=ids, finish_reason=reason, text=text)


def _check_target(engine_dir: Path, target: dict, dev: torch.device) -> None:
    want = target.get("device", "any")
    if want == "any":
        return
    if want != dev.type:
        raise EngineError(f"{engine_dir}: built for target {want} but asked to run on {dev.type}; run "
                          f"with device={want} or rebuild with target=any|{dev.type}")
    sm = target.get("sm")
    if want == "cuda" and sm:
        have = "%d%d" % torch.cuda.get_device_capability(dev)
        if str(sm) != have:
            raise EngineError(f"{engine_dir}: built for sm_{sm} but this GPU is sm_{have}; "
                              "rebuild the engine on this GPU or with target=any")
