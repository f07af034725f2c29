"""Greedy decoding with a static KV cache and one CUDA graph per decode step.

Applied equally to the bf16 transformers model and to a loaded .cllm model (its `gpu` tier:
resident int8 weights, fused Triton kernels), so the launch overhead that dominates batch-1
decoding in eager PyTorch is gone from both and the weight read shows. Streaming tiers are not
capturable (their copies and nvCOMP decodes are enqueued per forward by the host).

    gen = GraphGenerator(model, max_len=80)     # captures once
    ids = gen.generate(prompt_ids, 64)          # prefill eager, then 63 graph replays

On a machine without CUDA (or with capture=False), the same loop runs eagerly: the tests use
that to check the static-cache loop gives the tokens of `model.generate`.
"""

from __future__ import annotations

import inspect

import torch


class GraphGenerator:
    """Greedy batch-1 decoding of a transformers causal LM with a StaticCache and a captured
    decode step.

    Args:
        model: a transformers causal LM (or the `.model` of a loaded .cllm model).
        max_len: prompt + new tokens the cache holds.
        capture: capture the decode step in a CUDA graph (default: when the model is on CUDA).
    """

    def __init__(self, model, max_len: int, capture: bool | None = None):
        from transformers import StaticCache

        self.model = model
        param = next(p for p in model.parameters() if p.device.type != "meta")
        self.device = param.device
        self.max_len = max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph = None
        self.out = None
        # transformers 5.24 renamed forward's past_key_values to cache
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        kw = {self._cache_kw: self.cache}
        logits = self.model(input_ids=ids, cache_position=pos, use_cache=True, **kw).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    def _capture(self) -> None:
        # warm up on a side stream (cuBLAS/Triton handles, lazy cache allocation), then capture
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(self.ids, self.pos)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._forward(self.ids, self.pos)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """prompt [1, L] -> [1, L + new_tokens] greedy tokens (no stopping at EOS)."""
        n = prompt.shape[-1]
        if prompt.shape[0] != 1 or n + new_tokens > self.max_len:
            raise ValueError(f"batch 1 and at most {self.max_len} tokens in all")
        self.cache.reset()
        prompt = prompt.to(self.device)
        token = self._forward(prompt, torch.arange(n, device=self.device))
        tokens = [token]
        self.ids.copy_(token)
        self.pos.fill_(n)
        if self.capture and self.graph is None and new_tokens > 1:
            self._capture()  # capture writes position n; the replay below rewrites it identically
        for _ in range(new_tokens - 1):
            if self.graph is not None:
                self.graph.replay()
                token = self.out
            else:
                token = self._forward(self.ids, self.pos)
            tokens.append(token.clone())
            self.ids.copy_(token)
            self.pos.add_(1)
        return torch.cat([prompt, *tokens], dim=-1)
