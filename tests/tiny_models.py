"""Tiny random transformers models, saved as Hugging Face folders (safetensors + a tiny
tokenizer built offline), for loader and architecture tests. Not a test module."""

from __future__ import annotations

import weakref
from pathlib import Path

import torch

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a small model reads a compressed file and answers questions",
    "paris is the capital of france and berlin is the capital of germany",
    "every layer is decoded right before it runs then its memory is reused",
    "what is the capital of italy ? rome is",
]

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]", "[MASK]"]

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


def tiny_tokenizer(chat_template: str | None = None):
    """A WordLevel tokenizer over SENTENCES' words, wrapped in PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in SENTENCES for w in s.split()} | {"user", "assistant", ":"})
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


ARCHS = ("llama", "llama-tied", "llama-alias", "mistral", "qwen2", "gpt2", "bert")
"""llama-tied: tie_word_embeddings, lm_head absent from the checkpoint; llama-alias: the
checkpoint stores lm_head.weight as a copy of the embedding, which the converter aliases."""


def tiny_config(arch: str, vocab_size: int):
    """A small random config of `arch` (2 layers, hidden 64)."""
    import transformers as T

    common = dict(vocab_size=vocab_size, initializer_range=0.08, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    if arch in ("llama", "llama-tied", "llama-alias"):
        cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=arch != "llama",
                            **common)
        cfg.architectures = ["LlamaForCausalLM"]
    elif arch == "mistral":
        cfg = T.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, sliding_window=16,
                              tie_word_embeddings=False, **common)
        cfg.architectures = ["MistralForCausalLM"]
    elif arch == "qwen2":
        cfg = T.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, **common)
        cfg.architectures = ["Qwen2ForCausalLM"]
    elif arch == "gpt2":
        cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
        cfg.architectures = ["GPT2LMHeadModel"]
    elif arch == "bert":
        cfg = T.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=128, vocab_size=vocab_size, initializer_range=0.08, pad_token_id=0)
        cfg.architectures = ["BertModel"]
    else:
        raise ValueError(arch)
    return cfg


def model_class(arch: str):
    import transformers as T

    return T.AutoModel if arch == "bert" else T.AutoModelForCausalLM


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Make norms and biases non-trivial (random init leaves them at 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                if "norm" in name.lower() or name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                    p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def make_folder(arch: str, folder: Path, seed: int = 0, chat_template: str | None = None):
    """Save a tiny random `arch` model + tokenizer to `folder`. Returns (config, tokenizer)."""
    tok = tiny_tokenizer(chat_template)
    cfg = tiny_config(arch, len(tok))
    torch.manual_seed(seed)
    model = model_class(arch).from_config(cfg, dtype=torch.float32)
    randomize(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if arch == "llama-alias":
        from safetensors.torch import load_file, save_file

        sd = load_file(folder / "model.safetensors")
        assert "lm_head.weight" not in sd
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    tok.save_pretrained(folder)
    return cfg, tok


def reference_from_file(arch: str, cllm_path: Path, config) -> torch.nn.Module:
    """A plain transformers model holding the .cllm file's own (dequantized) weights."""
    import codecllm_format

    ref = model_class(arch).from_config(config, dtype=torch.float32)
    with codecllm_format.open(cllm_path) as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    tied = set(getattr(ref, "all_tied_weights_keys", {}) or {})
    assert not unexpected, unexpected
    assert set(missing) <= tied, (missing, tied)
    return ref.eval()


class Recorder:
    """Wraps a provider's methods in place: records calls and keeps weak references to every
    tensor handed out, to prove they do not outlive the forward."""

    def __init__(self, provider):
        self.events: list[tuple] = []
        self.handed_out: list[weakref.ref] = []
        for meth in ("linear_weight", "embedding_rows", "begin_group", "end_group"):
            orig = getattr(provider, meth)
            setattr(provider, meth, self._wrap(meth, orig))

    def _wrap(self, meth, orig):
        def call(*args):
            self.events.append((meth, args[0]))
            out = orig(*args)
            if out is not None:
                self.handed_out.extend(weakref.ref(t) for t in out)
            return out

        return call


def check_bracketing(m, rec: Recorder) -> list[str]:
    """Every weight access lies between begin_group and end_group of its own group, and group
    calls never nest. Returns the names of the groups begun, in order."""
    groups = [g.name for g in m.file.index.groups]
    open_group = None
    begun = []
    for meth, arg in rec.events:
        if meth == "begin_group":
            assert open_group is None, f"begin_group({groups[arg]}) inside {groups[open_group]}"
            open_group = arg
            begun.append(groups[arg])
        elif meth == "end_group":
            assert arg == open_group
            open_group = None
        else:
            assert open_group is not None, f"{meth}({arg}) outside any group"
            assert m.file.entry(arg).group == open_group, f"{meth}({arg}) inside {groups[open_group]}"
    assert open_group is None
    return begun
